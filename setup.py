"""The one part of corral that pyproject.toml cannot say: the C extension.

supervisor/_zmqframes.c moves whole ZeroMQ messages in one call (see
supervisor/frames.py). It is optional: without a C compiler the build goes
on without it and corral uses plain pyzmq, only slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("supervisor._zmqframes", ["supervisor/_zmqframes.c"],
                             extra_compile_args=["-O2"], optional=True)])
