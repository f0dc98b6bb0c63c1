/* ipc._framedrop: receive and let go of the rest of a ZeroMQ message, in C.

A peer chooses how many frames its message has, and ZeroMQ has no per-message frame limit:
the router must receive every frame of a message it refuses before it can read the next
one. From Python each frame costs a pyzmq call and a Frame object (1 to 2 us); this loop
costs libzmq's own receive (about 60 ns), so 10,000 frames take 0.6 ms instead of 13.

No zmq.h and no link against libzmq: the functions come as addresses from the libzmq that
pyzmq itself loaded (ipc/native.py), so the socket and the functions always belong to the
same library. Nothing here keeps a frame or a Python object.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* zmq_msg_t as zmq.h declares it: 64 opaque bytes, pointer-aligned. */
typedef struct {
    unsigned char bytes[64];
} __attribute__((aligned(sizeof(void *)))) msg_t;

typedef int (*msg_init_fn)(msg_t *);
typedef int (*msg_recv_fn)(msg_t *, void *, int);
typedef int (*msg_more_fn)(const msg_t *);
typedef int (*msg_close_fn)(msg_t *);
typedef int (*errno_fn)(void);

static msg_init_fn msg_init;
static msg_recv_fn msg_recv;
static msg_more_fn msg_more;
static msg_close_fn msg_close;
static errno_fn zmq_errno_;

static void *as_pointer(PyObject *value) {
    void *p = PyLong_AsVoidPtr(value);
    if (p == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "a null function or socket address");
    return p;
}

static PyObject *bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *p[5];
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "bind(zmq_msg_init, zmq_msg_recv, zmq_msg_more, zmq_msg_close, zmq_errno)");
        return NULL;
    }
    for (int i = 0; i < 5; i++)
        if ((p[i] = as_pointer(args[i])) == NULL)
            return NULL;
    msg_init = (msg_init_fn)p[0];
    msg_recv = (msg_recv_fn)p[1];
    msg_more = (msg_more_fn)p[2];
    msg_close = (msg_close_fn)p[3];
    zmq_errno_ = (errno_fn)p[4];
    Py_RETURN_NONE;
}

/* drop(socket_address, flags) -> (frames received, errno): receives frames until one without
   MORE. errno is 0 when the message ended; otherwise the receive that failed set it, and the
   caller goes on from there (the frames counted are gone). */
static PyObject *drop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    msg_t msg;
    long frames = 0;
    int error = 0;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "drop(socket_address, flags)");
        return NULL;
    }
    if (msg_recv == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() was not called");
        return NULL;
    }
    void *socket = as_pointer(args[0]);
    if (socket == NULL)
        return NULL;
    int flags = PyLong_AsLong(args[1]);
    if (flags == -1 && PyErr_Occurred())
        return NULL;
    if (msg_init(&msg) != 0)
        return Py_BuildValue("(li)", frames, zmq_errno_());
    for (;;) {
        if (msg_recv(&msg, socket, flags) < 0) {
            error = zmq_errno_();
            break;
        }
        frames++;
        if (!msg_more(&msg))
            break;
    }
    msg_close(&msg);
    return Py_BuildValue("(li)", frames, error);
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL,
     "bind(zmq_msg_init, zmq_msg_recv, zmq_msg_more, zmq_msg_close, zmq_errno): the "
     "addresses of libzmq's functions, from the library that owns the sockets."},
    {"drop", (PyCFunction)(void (*)(void))drop, METH_FASTCALL,
     "drop(socket_address, flags) -> (frames, errno): receive and let go of frames until "
     "the end of the message."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_framedrop",
    "Receive and let go of the rest of a ZeroMQ message in C (see ipc/native.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__framedrop(void) { return PyModule_Create(&module); }
