"""Code that runs in client processes: the native (CORRAL1) client and the load generator."""

from corral.client.native import Client, CurveKeys, NoReply, Reply

__all__ = ["Client", "CurveKeys", "NoReply", "Reply"]
