"""The one part of corral that pyproject.toml cannot say: the C extension.

supervisor/wire/_zmqframes.c moves whole ZeroMQ messages in one call (see
supervisor/wire/frames.py). It is optional: without a C compiler the build goes
on without it and corral uses plain pyzmq, only slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("corral.wire._zmqframes", ["supervisor/wire/_zmqframes.c"],
                             extra_compile_args=["-O2"], optional=True)])
