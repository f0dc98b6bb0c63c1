"""Wire protocol (frames, message kinds) and payload codecs shared by every process."""

from ipc.codec import Decoder, Encoder, PayloadError
from ipc.protocol import VERSION, FrameError, Kind, Message, decode, encode

__all__ = ["VERSION", "Decoder", "Encoder", "FrameError", "Kind", "Message", "PayloadError",
           "decode", "encode"]
