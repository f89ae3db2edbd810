"""A digest: what one link of the chain says, its bytes, its signature,
its name.

A digest object is one line of JSON, ``{"body": {...}, "signature":
"<base64>"}``, and a newline. The signature is Ed25519 over the body's
canonical bytes (:func:`canonical`: keys sorted, no spaces, ASCII), so a
verifier needs no copy of the bytes the signer had: it reads the body and
makes them again. Every value in a body is a string, an integer, a
boolean, null, a list or an object (never a float).

The body (:data:`FORMAT`):

==================  ========================================================
``format``          ``shoebox-digest/1``
``chain``           the chain's id (32 hex digits, drawn at its start)
``seq``             this digest's place in its chain, from 0
``host``,           the worker identity that keeps the chain
``directory``
``created``         when it was made (UTC, the worker's clock)
``range``           ``{"from", "to"}``: the previous digest's ``created``
                    (or the chain's start) to this one's
``previous``        ``{"name", "sha256"}`` of the previous digest object of
                    the chain; null for ``seq`` 0
``start``           on ``seq`` 0 only: why the chain starts (``{"reason"}``:
                    a first start, or the chain state missing, or a key
                    not the one the chain announced); which chain's key
                    it follows, if any, the verifier finds by the key
``public_key``      the key this digest is signed with
``next_public_key`` the key the next digest (of any chain that follows
                    this one) is signed with
``interval``        ``[integrity] digest_interval`` (seconds)
``final``           true when written at a clean stop
``archives``        the archives shipped since the previous digest
                    (:data:`ENTRY_FIELDS`)
==================  ========================================================
"""

import base64
import binascii
import datetime
import hashlib
import json
import re

from shoebox_worker import exceptions
from shoebox_worker.integrity import keys

__all__ = ["FORMAT", "DEFAULT_PREFIX", "DigestError", "canonical", "sign",
           "parse", "name", "parse_name", "sha256"]

FORMAT = "shoebox-digest/1"
#: Where digests go in the container unless ``digest_prefix`` says.
DEFAULT_PREFIX = "_digests/"
#: What each archive's entry holds (``run``, ``sequence`` and ``offsets``
#: only when known).
ENTRY_FIELDS = ("name", "size", "sha256", "etag", "records", "earliest",
                "latest", "run", "sequence", "offsets")
#: ``<prefix><chain>/<seq, 12 digits>.json``: a chain's digests list in
#: order.
_NAME = re.compile(r"(?P<chain>[0-9a-f]{32})/(?P<seq>[0-9]{12})\.json\Z")


class DigestError(exceptions.ShoeboxError):
    """Bytes that are not a digest of this format (one line)."""


def canonical(value):
    """The bytes a body is signed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode("ascii")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def sign(body, key):
    """The digest object's bytes: ``body`` signed with ``key``."""
    signature = key.sign(canonical(body))
    return canonical({"body": body,
                      "signature": base64.b64encode(signature).decode()}) \
        + b"\n"


def parse(data):
    """``(body, signature bytes)`` of a digest object's bytes.

    :raises DigestError: not one (the message says what is wrong).
    """
    try:
        outer = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DigestError("not JSON: %s" % exc) from None
    if not isinstance(outer, dict) or set(outer) != {"body", "signature"}:
        raise DigestError("not {body, signature}")
    body = outer["body"]
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise DigestError("body is not of format %s" % FORMAT)
    try:
        signature = base64.b64decode(outer["signature"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DigestError("signature is not base64") from None
    for field, kind in (("chain", str), ("seq", int), ("created", str),
                        ("public_key", str), ("next_public_key", str),
                        ("archives", list), ("interval", int)):
        if not isinstance(body.get(field), kind) or \
                isinstance(body.get(field), bool):
            raise DigestError("field %r is missing or not a %s"
                              % (field, kind.__name__))
    previous = body.get("previous")
    if previous is not None and not (
            isinstance(previous, dict)
            and isinstance(previous.get("name"), str)
            and isinstance(previous.get("sha256"), str)):
        raise DigestError("field 'previous' is not {name, sha256}")
    for field in ("public_key", "next_public_key"):
        try:
            keys.parse_public(body[field])
        except keys.KeyError_:
            raise DigestError("field %r is not an ed25519: key"
                              % field) from None
    span = body.get("range")
    if not (_is_time(body["created"]) and isinstance(span, dict)
            and _is_time(span.get("from")) and _is_time(span.get("to"))):
        raise DigestError("field 'created' or 'range' is not a time")
    if body.get("start") is not None and not isinstance(body["start"], dict):
        raise DigestError("field 'start' is not an object")
    for entry in body["archives"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("size"), int)):
            raise DigestError("an archive entry has no name or size")
        if not _entry_ok(entry):
            raise DigestError("the entry of %r has a field of the wrong type"
                              % entry["name"])
    return body, signature


def _is_time(value):
    """A time as a body holds it (``...Z``, as the audit reads it)."""
    if not isinstance(value, str):
        return False
    try:
        datetime.datetime.fromisoformat(value.rstrip("Z"))
    except ValueError:
        return False
    return True


def _entry_ok(entry):
    """Are an archive entry's optional fields of their types (what the
    audit computes with; a hostile store's digest is refused, not
    crashed on)?"""
    offsets = entry.get("offsets")
    return (all(entry.get(f) is None or isinstance(entry[f], str)
                for f in ("earliest", "latest", "run"))
            and (entry.get("sequence") is None
                 or isinstance(entry["sequence"], int))
            and (offsets is None or isinstance(offsets, dict) and all(
                isinstance(span, list) and len(span) == 2
                and all(isinstance(n, int) for n in span)
                for span in offsets.values())))


def signed_by(body, signature, public):
    """Does ``signature`` sign ``body`` with the public key ``public``?"""
    return keys.verify(public, signature, canonical(body))


def name(prefix, chain, seq):
    """The object name of digest ``seq`` of ``chain``."""
    return "%s%s/%012d.json" % (prefix, chain, seq)


def parse_name(prefix, obj):
    """``(chain, seq)`` of a digest object name, or None."""
    if not obj.startswith(prefix):
        return None
    match = _NAME.match(obj, len(prefix))
    if match is None:
        return None
    return match.group("chain"), int(match.group("seq"))
