"""Shipping: every closed archive through the callback chain, durably.

``shipper`` (the background state machine and its state files), ``steps``
(the built-in callbacks: gzip, zstd, move, change_extension, delete,
memory) and ``swift`` (the upload to OpenStack Swift).
"""
