"""What both sides of corral share: the client dialects and the worker protocol
(protocol.py), frame I/O (frames.py, _zmqframes.c), the sliding window of the
restart budget (window.py), and log and process set-up (logs.py, tuning.py).
The arbiter and the worker import this room; it imports neither of them."""
