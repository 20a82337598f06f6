/* _zmqframes: whole multipart messages in and out of a ZeroMQ socket in one call.
 *
 * pyzmq costs about 0.8 us per frame received (a recv, then a getsockopt for
 * ZMQ_RCVMORE that goes through an enum conversion) and ends every drain with
 * a zmq.Again exception; for the broker's 6-frame client requests that is
 * 5 us of a 30 us budget. Here a drain of every waiting message, frames and
 * all, is one call: 0.5 us per message.
 *
 * It calls the very libzmq that pyzmq loaded, on the socket handle pyzmq
 * gives (`Socket.underlying`): the caller names pyzmq's own extension module,
 * which is opened with RTLD_NOLOAD (so never a second copy) and whose handle
 * dlsym searches together with the libraries it was linked against (pyzmq's
 * bundled libzmq, or libzmq inside the module itself). Refusals are raised by
 * a Python function the caller hands to load(), so that both implementations
 * in corral/wire/frames.py raise the same zmq exceptions. Nothing here
 * blocks: a drain starts with ZMQ_DONTWAIT and only reads the rest of a
 * message already begun (libzmq delivers a multipart message whole).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

typedef struct { unsigned char opaque[64]; } __attribute__((aligned(8))) zmq_msg_t;

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2

static int (*msg_init)(zmq_msg_t *);
static int (*msg_recv)(zmq_msg_t *, void *, int);
static int (*msg_close)(zmq_msg_t *);
static void *(*msg_data)(zmq_msg_t *);
static size_t (*msg_size)(const zmq_msg_t *);
static int (*msg_more)(const zmq_msg_t *);
static const char *(*msg_gets)(const zmq_msg_t *, const char *);   /* optional: libzmq >= 4.1 */
static int (*zsend)(void *, const void *, size_t, int);
static int (*zerrno)(void);
static PyObject *raise_errno;  /* errno -> raises the zmq exception pyzmq would */

static PyObject *load(PyObject *self, PyObject *args) {
    const char *path;
    PyObject *raiser;
    if (!PyArg_ParseTuple(args, "sO", &path, &raiser))
        return NULL;
    if (!PyCallable_Check(raiser))
        return PyErr_Format(PyExc_TypeError, "load(path, raise_errno): raise_errno must be callable");
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        return PyErr_Format(PyExc_OSError, "libzmq is not loaded from %s: %s", path, dlerror());
    msg_init = dlsym(lib, "zmq_msg_init");
    msg_recv = dlsym(lib, "zmq_msg_recv");
    msg_close = dlsym(lib, "zmq_msg_close");
    msg_data = dlsym(lib, "zmq_msg_data");
    msg_size = dlsym(lib, "zmq_msg_size");
    msg_more = dlsym(lib, "zmq_msg_more");
    msg_gets = dlsym(lib, "zmq_msg_gets");
    zsend = dlsym(lib, "zmq_send");
    zerrno = dlsym(lib, "zmq_errno");
    if (!(msg_init && msg_recv && msg_close && msg_data && msg_size && msg_more && zsend && zerrno)) {
        msg_init = NULL;
        return PyErr_Format(PyExc_OSError, "%s lacks a zmq_msg_* or zmq_send symbol", path);
    }
    Py_INCREF(raiser);
    Py_XSETREF(raise_errno, raiser);
    Py_RETURN_NONE;
}

/* NULL with the exception raise_errno(error) raised. */
static PyObject *fail(int error) {
    PyObject *result = PyObject_CallFunction(raise_errno, "i", error);
    if (result != NULL) {
        Py_DECREF(result);
        PyErr_Format(PyExc_RuntimeError, "raise_errno(%d) returned instead of raising", error);
    }
    return NULL;
}

static int loaded(void) {
    if (msg_init == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_zmqframes.load() has not succeeded");
        return 0;
    }
    return 1;
}

/* The next frame of a message, or NULL with an exception (or, for the first
 * frame only, NULL and *empty set when nothing is waiting). With `user`, the
 * frame's User-Id property (ZAP's name for the connection) or None. */
static PyObject *frame(void *socket, int first, int *more, int *empty, PyObject **user) {
    zmq_msg_t msg;
    msg_init(&msg);
    int rc;
    do {
        rc = msg_recv(&msg, socket, first ? ZMQ_DONTWAIT : 0);
    } while (rc < 0 && !first && zerrno() == EINTR);
    if (rc < 0) {
        int error = zerrno();
        msg_close(&msg);
        if (first && (error == EAGAIN || error == EINTR)) {
            *empty = 1;
            return NULL;
        }
        return fail(error);
    }
    PyObject *bytes = PyBytes_FromStringAndSize(msg_data(&msg), (Py_ssize_t)msg_size(&msg));
    *more = msg_more(&msg);
    if (user != NULL && bytes != NULL) {
        const char *name = msg_gets(&msg, "User-Id");
        if (name != NULL) {
            *user = PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "replace");
        } else {
            Py_INCREF(Py_None);
            *user = Py_None;
        }
        if (*user == NULL) {
            Py_DECREF(bytes);
            bytes = NULL;
        }
    }
    msg_close(&msg);
    return bytes;
}

/* Every message waiting, up to limit: [[frame, ...], ...], or with_user
 * [([frame, ...], user), ...]. */
static PyObject *drain_messages(void *socket, int limit, int with_user) {
    PyObject *messages = PyList_New(0);
    if (messages == NULL)
        return NULL;
    for (int m = 0; m < limit; m++) {
        int more = 1, empty = 0;
        PyObject *frames = NULL, *user = NULL;
        for (int first = 1; more; first = 0) {
            PyObject *bytes = frame(socket, first, &more, &empty, with_user && first ? &user : NULL);
            if (bytes == NULL) {
                Py_XDECREF(frames);
                Py_XDECREF(user);
                if (empty)
                    return messages;
                if (first && PyList_GET_SIZE(messages) > 0) {
                    PyErr_Clear();  /* hand over what came; the next drain raises it */
                    return messages;
                }
                Py_DECREF(messages);
                return NULL;
            }
            if (frames == NULL && (frames = PyList_New(0)) == NULL) {
                Py_DECREF(bytes);
                Py_XDECREF(user);
                Py_DECREF(messages);
                return NULL;
            }
            int failed = PyList_Append(frames, bytes);
            Py_DECREF(bytes);
            if (failed) {
                Py_DECREF(frames);
                Py_XDECREF(user);
                Py_DECREF(messages);
                return NULL;
            }
        }
        PyObject *item = frames;
        if (with_user) {
            item = PyTuple_Pack(2, frames, user);
            Py_DECREF(frames);
            Py_DECREF(user);
            if (item == NULL) {
                Py_DECREF(messages);
                return NULL;
            }
        }
        int failed = PyList_Append(messages, item);
        Py_DECREF(item);
        if (failed) {
            Py_DECREF(messages);
            return NULL;
        }
    }
    return messages;
}

/* drain(handle, limit) -> [[frame, ...], ...]: every message waiting, up to limit. */
static PyObject *drain(PyObject *self, PyObject *args) {
    unsigned long long handle;
    int limit;
    if (!PyArg_ParseTuple(args, "Ki", &handle, &limit) || !loaded())
        return NULL;
    return drain_messages((void *)(uintptr_t)handle, limit, 0);
}

/* drain_with_user(handle, limit) -> [([frame, ...], user or None), ...] */
static PyObject *drain_with_user(PyObject *self, PyObject *args) {
    unsigned long long handle;
    int limit;
    if (!PyArg_ParseTuple(args, "Ki", &handle, &limit) || !loaded())
        return NULL;
    if (msg_gets == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this libzmq has no zmq_msg_gets");
        return NULL;
    }
    return drain_messages((void *)(uintptr_t)handle, limit, 1);
}

/* send(handle, frames, flags) -> None; a frame libzmq refuses is raised through
 * raise_errno (EAGAIN at the high-water mark, EHOSTUNREACH for a gone ROUTER
 * peer: both refused at the first frame, before anything is queued). EINTR
 * is retried, as pyzmq does. */
static PyObject *send(PyObject *self, PyObject *args) {
    unsigned long long handle;
    PyObject *frames;
    int flags;
    if (!PyArg_ParseTuple(args, "KOi", &handle, &frames, &flags) || !loaded())
        return NULL;
    void *socket = (void *)(uintptr_t)handle;
    PyObject *sequence = PySequence_Fast(frames, "frames must be a list or tuple");
    if (sequence == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sequence, i), &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(sequence);
            return NULL;
        }
        int rc, error = 0;
        do {
            rc = zsend(socket, view.buf, (size_t)view.len, flags | (i + 1 < count ? ZMQ_SNDMORE : 0));
        } while (rc < 0 && (error = zerrno()) == EINTR);
        PyBuffer_Release(&view);
        if (rc < 0) {
            Py_DECREF(sequence);
            return fail(error);
        }
    }
    Py_DECREF(sequence);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "load(path, raise_errno): bind to the libzmq that the loaded module at path links"},
    {"drain", drain, METH_VARARGS, "drain(handle, limit) -> list of messages (lists of frames)"},
    {"drain_with_user", drain_with_user, METH_VARARGS,
     "drain_with_user(handle, limit) -> list of (frames, User-Id or None)"},
    {"send", send, METH_VARARGS, "send(handle, frames, flags) -> None; refusals raised via raise_errno"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_zmqframes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__zmqframes(void) { return PyModule_Create(&module); }
