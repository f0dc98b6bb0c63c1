"""The router process: admits client requests and dispatches them to worker processes.

``router.router.Router`` is the process (its poll loop and sockets); ``router.core`` holds
every decision, split by responsibility into the other modules of this package.
"""
