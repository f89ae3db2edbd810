"""The operator tools: ``cat``, ``verify``, ``replay``, ``generate``.

``commands`` (the subcommands) and ``generator`` (synthetic nova
notifications for demos and load tests).
"""
