"""Turn option strings into values: the one set of coercers.

Options arrive as strings: the config's fixed sections
(:mod:`shoebox_worker.config`) and the plugin sections, whose strings go
to the plugins' constructors as keyword arguments (roll checkers, the
built-in steps, :mod:`shoebox_worker.ship.swift`). All of them turn those
strings into values here, so ``yes`` is true, ``100M`` is a size and
``nan`` is not a number in the same way everywhere, and a mistake reads the
same wherever it is made::

    expected an integer >= 1, got '0'

Each function below makes a *coercer*: a callable that takes the value
(a string, or already a value of the right type, as tests and callers in
code pass) and returns the typed value, or raises :class:`OptionError`
whose message says what was expected and what it got. Surrounding
whitespace is ignored. A value that is empty (``""``, only blanks, or
None) is refused unless the coercer was made with ``empty=``, the value
an empty option stands for (``empty=None``: "not set").

The config names the file, section and key of a refused value itself; a
plugin constructor names the option with :func:`coerce`, whose
:class:`OptionError` carries it (:mod:`shoebox_worker.plugins` turns that
into the ``[callback:NAME] key: ...`` line).
"""

import difflib
import math
import os
import re
import types

__all__ = [
    "BOOLEANS",
    "OptionError",
    "boolean",
    "choice",
    "coerce",
    "did_you_mean",
    "integer",
    "integer_in",
    "items",
    "mode",
    "name",
    "names",
    "number",
    "pairs",
    "path",
    "size",
    "text",
]

#: The one table of boolean words (matched case-insensitively).
BOOLEANS = types.MappingProxyType({
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
})

#: Binary size units: ``100M`` is 100 MiB.
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"([0-9]+)\s*([KMGT]?)(?:I?B)?\Z", re.IGNORECASE)
_INT = re.compile(r"[+-]?[0-9]+\Z")
#: Default of ``empty``: an empty value is refused.
_REFUSED = object()


class OptionError(ValueError):
    """A value that does not coerce; the message says what was expected.

    :param message: e.g. ``expected an integer, got 'ten'``.
    :param option: the option's name, when known; ``str()`` then starts
        with ``"option: "``.
    """

    def __init__(self, message, option=None):
        self.message = message
        self.option = option
        super().__init__("%s: %s" % (option, message) if option else message)


def coerce(option, value, coercer):
    """``coercer(value)``, naming ``option`` in the error.

    For plugin constructors::

        self.level = coerce("level", level, integer_in(1, 9))

    :raises OptionError: with :attr:`~OptionError.option` set.
    """
    try:
        return coercer(value)
    except OptionError as err:
        raise OptionError(err.message, option) from None


def did_you_mean(word, candidates, template="%s"):
    """`` (did you mean X?)`` for the closest candidate, or ``""``."""
    match = difflib.get_close_matches(word, list(candidates), n=1)
    if not match:
        return ""
    return " (did you mean %s?)" % (template % match[0])


def _stripped(value):
    """``value`` as a stripped string ("" for None)."""
    return "" if value is None else str(value).strip()


def _empty(value):
    return value is None or (isinstance(value, str) and not value.strip())


def _optional(parse, empty):
    """``parse``, except that an empty value gives ``empty`` (if set)."""
    if empty is _REFUSED:
        return parse

    def optional(value):
        return empty if _empty(value) else parse(value)
    return optional


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value):
    """An int, or a string holding only an integer, as an int; else None."""
    if _is_int(value):
        return value
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value)
    return None


def integer(minimum=None, maximum=None, empty=_REFUSED):
    """An integer, written as one (``2.0`` is not), within bounds."""
    if maximum is not None and minimum is not None:
        bounds = "from %d to %d" % (minimum, maximum)
    elif minimum is not None:
        bounds = ">= %d" % minimum
    elif maximum is not None:
        bounds = "<= %d" % maximum

    def parse(value):
        number = _as_int(value)
        if number is None:
            raise OptionError("expected an integer, got %r" % (value,))
        if ((minimum is not None and number < minimum)
                or (maximum is not None and number > maximum)):
            raise OptionError("expected an integer %s, got %r"
                              % (bounds, value))
        return number
    return _optional(parse, empty)


def integer_in(low, high, empty=_REFUSED):
    """One of the integers ``low`` to ``high`` (a format version, a
    compression level): ``expected 1 to 9`` whatever the mistake."""
    expected = ("%d or %d" if high == low + 1 else "%d to %d") % (low, high)

    def parse(value):
        number = _as_int(value)
        if number is None or not low <= number <= high:
            raise OptionError("expected %s, got %r" % (expected, value))
        return number
    return _optional(parse, empty)


def number(minimum=None, exclusive=False, whole=False, empty=_REFUSED):
    """A finite number (a float; an int when ``whole``).

    :param minimum: the least value allowed (None: any).
    :param exclusive: ``minimum`` itself is not allowed.
    :param whole: refuse fractions (a count written as a number).
    """
    def parse(value):
        if isinstance(value, bool):
            result = math.nan
        elif isinstance(value, (int, float)):
            result = value
        else:
            try:
                result = float(value)
            except (TypeError, ValueError):
                result = math.nan
        if not math.isfinite(result):
            raise OptionError("expected a number, got %r" % (value,))
        if minimum is not None:
            if exclusive and result <= minimum:
                raise OptionError("expected a number > %g, got %r"
                                  % (minimum, value))
            if result < minimum:
                raise OptionError("expected a number >= %g, got %r"
                                  % (minimum, value))
        if whole:
            if not (_is_int(value) or (isinstance(value, str)
                                       and _INT.match(value.strip()))
                    or (isinstance(value, float) and value.is_integer())):
                raise OptionError("expected a whole number, got %r"
                                  % (value,))
            return int(result)
        return float(result)
    return _optional(parse, empty)


def boolean(empty=_REFUSED):
    """True or false, spelled as in :data:`BOOLEANS`."""
    def parse(value):
        if isinstance(value, bool):
            return value
        try:
            return BOOLEANS[_stripped(value).lower()]
        except KeyError:
            raise OptionError("expected true or false (or yes/no, on/off, "
                              "1/0), got %r" % (value,)) from None
    return _optional(parse, empty)


def size(minimum=1, maximum=None, empty=_REFUSED):
    """Bytes, or ``256K``, ``100M``, ``1G``, ``5GiB`` (binary units)."""
    def parse(value):
        if _is_int(value):
            result = value
        else:
            match = _SIZE.match(_stripped(value))
            if not match:
                raise OptionError("expected a size like 1073741824, 100M or "
                                  "1G, got %r" % (value,))
            result = int(match.group(1)) * _UNITS[match.group(2).upper()]
        if result < minimum or (maximum is not None and result > maximum):
            if maximum is None:
                bounds = ">= %d bytes" % minimum
            else:
                bounds = "from %d to %d bytes" % (minimum, maximum)
            raise OptionError("expected a size %s, got %r" % (bounds, value))
        return result
    return _optional(parse, empty)


def choice(*choices, upper=False):
    """One of ``choices``, matched case-insensitively; returned in the
    case of ``choices`` (lower, or ``upper``)."""
    def parse(value):
        word = _stripped(value)
        word = word.upper() if upper else word.lower()
        if word in choices:
            return word
        raise OptionError("expected one of %s, got %r%s" % (
            ", ".join(choices), value, did_you_mean(word, choices)))
    return parse


_MODE = re.compile(r"(?:0o?)?([0-7]{1,4})\Z", re.IGNORECASE)


def mode(empty=_REFUSED):
    """File permission bits, in octal: ``0640``, ``640`` or ``0o640``
    (from 0 to 0777: no setuid, setgid or sticky bit)."""
    def parse(value):
        if _is_int(value):
            result = value
        else:
            match = _MODE.match(_stripped(value))
            result = int(match.group(1), 8) if match else None
        if result is None or not 0 <= result <= 0o777:
            raise OptionError("expected permission bits in octal, from 0000 "
                              "to 0777 (e.g. 0640), got %r" % (value,))
        return result
    return _optional(parse, empty)


def text(empty=_REFUSED):
    """Any text, stripped."""
    def parse(value):
        result = _stripped(value)
        if not result:
            raise OptionError("must not be empty")
        return result
    return _optional(parse, empty)


def name(empty=_REFUSED):
    """Text that can name a file or a container: no ``/``, no NUL."""
    def parse(value):
        result = text()(value)
        if "/" in result or "\0" in result:
            raise OptionError("expected a name without '/', got %r"
                              % (value,))
        return result
    return _optional(parse, empty)


def path(empty=_REFUSED):
    """A file system path, made absolute (``~`` expanded)."""
    def parse(value):
        return os.path.abspath(os.path.expanduser(text()(value)))
    return _optional(parse, empty)


def items(value):
    """Comma- (or newline-) separated items, stripped, blanks dropped."""
    return [item.strip() for item in re.split(r"[,\n]", _stripped(value))
            if item.strip()]


def names(item):
    """A comma list of distinct items, each checked by the coercer
    ``item``; a tuple (empty for an empty value)."""
    def parse(value):
        result = []
        for each in items(value):
            each = item(each)
            if each in result:
                raise OptionError("%r is listed twice" % each)
            result.append(each)
        return tuple(result)
    return parse


def pairs(convert=str):
    """A comma list of ``key=value`` with distinct keys; a read-only
    mapping of each key to ``convert(value)``."""
    def parse(value):
        result = {}
        for item in items(value):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not key:
                raise OptionError("expected key=value, got %r" % item)
            if key in result:
                raise OptionError("%r is set twice" % key)
            result[key] = convert(raw)
        return types.MappingProxyType(result)
    return parse
