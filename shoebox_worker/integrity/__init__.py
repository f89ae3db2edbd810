"""Evidence: a signed, forward-secure chain of digests over every shipped
archive (``[integrity]``; docs/integrity.md).

- :mod:`.keys`: Ed25519 keys (``shoebox-worker keygen``), and how the key
  file is replaced by the next key at every digest;
- :mod:`.digest`: a digest's body, bytes, signature and object name;
- :mod:`.chain`: the worker's side: archives recorded as the store verified
  them, digests made, signed and stored, crash by crash;
- :mod:`.audit`: ``verify --chain``: every chain walked from pinned keys.
"""
