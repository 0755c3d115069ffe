"""Personal-information detection and masking for Chinese and English text: ID cards, phones, emails, bank cards,
IP addresses, passports and URLs that carry secrets, each replaced by a placeholder such as <PHONE>.

Owns the patterns, their validation (checksums, dates, Luhn, ipaddress) and overlap resolution. Works on one string
at a time: must not read or write files, nor decide which fields of a record get masked (the clean step does).
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date

from ..errors import ConfigError

# Order = priority when two matches overlap: the earlier type wins (then the longer match, then the earlier one).
# A URL holding a secret swallows any email/IP inside it; an ID card number is also checked before the bank-card
# (Luhn) and phone patterns it could be confused with.
PII_TYPES = ("SECRET_URL", "EMAIL", "ID_CARD", "BANK_CARD", "PHONE", "PASSPORT", "IP")
PLACEHOLDERS = {name: f"<{name}>" for name in PII_TYPES}


@dataclass(frozen=True, slots=True)
class Match:
    """One piece of personal information: its type, its span text[start:end], and that text."""

    type: str
    start: int
    end: int
    text: str


def mask_pii(text: str, types: Iterable[str] | None = None) -> tuple[str, Counter[str]]:
    """Replace every match of `types` (default: all of PII_TYPES) by its placeholder; return the new text and how many
    matches of each type were replaced."""
    spans = _spans(text, _checked_types(types))
    counts: Counter[str] = Counter()
    if not spans:
        return text, counts
    parts, position = [], 0
    for start, end, name in spans:
        parts += (text[position:start], PLACEHOLDERS[name])
        counts[name] += 1
        position = end
    parts.append(text[position:])
    return "".join(parts), counts


def find_pii(text: str, types: Iterable[str] | None = None) -> list[Match]:
    """The matches mask_pii would replace, in text order, without overlaps."""
    return [Match(name, start, end, text[start:end]) for start, end, name in _spans(text, _checked_types(types))]


def _checked_types(types: Iterable[str] | None) -> tuple[str, ...]:
    if types is None:
        return PII_TYPES
    wanted = {types} if isinstance(types, str) else set(types)
    unknown = sorted(str(name) for name in wanted.difference(PII_TYPES))
    if unknown:
        close = difflib.get_close_matches(unknown[0].upper(), PII_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown PII type {unknown[0]!r}{hint}; expected some of {', '.join(PII_TYPES)}")
    return tuple(name for name in PII_TYPES if name in wanted)


def _spans(text: str, types: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) in text order; on overlap the type earlier in PII_TYPES wins."""
    found = []
    numbers_from = None  # where the number-shaped types start looking; -1: the text holds no long number
    for name in types:
        pos = 0
        if name in _NUMBER_TYPES:
            # Most text holds no long number: one scan rules out four types, or says where the first one is.
            if numbers_from is None:
                number = _LONG_NUMBER.search(text)
                numbers_from = -1 if number is None else max(0, number.start() - 8)
            if numbers_from < 0:
                continue
            pos = numbers_from
        found += [(start, end, name) for start, end in _FINDERS[name](text, pos)]
    if len(found) < 2:
        return found
    found.sort(key=lambda m: (_RANK[m[2]], m[0] - m[1], m[0]))
    kept: list[tuple[int, int, str]] = []
    for start, end, name in found:
        if all(end <= k_start or start >= k_end for k_start, k_end, _ in kept):
            kept.append((start, end, name))
    return sorted(kept)


def _start(first: str, not_after: str = "[0-9A-Za-z]") -> str:
    """Regex: one character of class `first` that does not follow `not_after`.

    Chinese text has no spaces, so a word boundary is useless next to CJK; matches are bounded by "no ASCII letter
    or digit" instead. The lookbehind comes after the first character so that each pattern starts with a character
    class: the regex engine then skips in C to positions holding that character instead of trying every position
    (3x faster).
    """
    return f"[{first}](?<!{not_after}.)"


_NOT_BEFORE = r"(?![0-9A-Za-z])"

# --- ID_CARD: 18-digit resident ID (GB 11643). 15-digit pre-1999 numbers are not matched: they have no check digit,
# so about 3% of all 15-digit numbers (order and account numbers) would pass as one.
_ID_CARD = re.compile(_start("1-8") + r"[0-9]{5}(?:19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
                      r"[0-9]{3}[0-9Xx]" + _NOT_BEFORE)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_EARLIEST_BIRTH, _LATEST_BIRTH = date(1900, 1, 1), date.today()


def _id_cards(text: str, pos: int) -> Iterator[tuple[int, int]]:
    for m in _ID_CARD.finditer(text, pos):
        number = m.group().upper()
        if _ID_CHECK[sum(int(d) * w for d, w in zip(number, _ID_WEIGHTS)) % 11] != number[17]:
            continue
        try:
            born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
        except ValueError:  # 0229 in a non-leap year, 0431, ...
            continue
        if _EARLIEST_BIRTH <= born <= _LATEST_BIRTH:
            yield m.span()


# --- PHONE: mainland mobiles (optional +86/0086/86, groups 3-4-4 split by one kind of separator) and landlines with
# an area code (010, 02x, or 0xxx) that must be set off by a dash, space or brackets: an unseparated 11-12 digit
# number starting with 0 looks the same as an account number. "digit-" before or "-digit" after means the match is
# part of a longer dashed number.
_MOBILE = re.compile(_start("+018") + r"(?<![0-9]-.)(?:(?<=\+)86[ -]?1|(?<=0)086[ -]?1|(?<=8)6[ -]?1|(?<=1))"
                     r"[3-9][0-9](?P<sep>[ -]?)[0-9]{4}(?P=sep)[0-9]{4}" + _NOT_BEFORE + r"(?!-[0-9])")
_AREA = r"(?:10|2[0-9]|[3-9][0-9]{2})"
_LANDLINE = re.compile(r"(?:" + _start("0") + r"(?<![0-9]-.)" + _AREA + r"[ -]|[(（]0" + _AREA + r"[)）][ -]?)"
                       r"[1-9][0-9]{6,7}(?:(?:-|转|分机|ext\.? ?)[0-9]{1,6})?" + _NOT_BEFORE + r"(?!-[0-9])")


def _phones(text: str, pos: int) -> Iterator[tuple[int, int]]:
    for m in _MOBILE.finditer(text, pos):
        yield m.span()
    if "0" in text:
        for m in _LANDLINE.finditer(text, pos):
            yield m.span()


# --- EMAIL: ASCII addresses; the domain ends in an alphabetic TLD, so "a@b.com谢谢" stops before the CJK text.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])")


def _emails(text: str, pos: int) -> Iterator[tuple[int, int]]:
    if "@" in text:
        for m in _EMAIL.finditer(text, pos):
            yield m.span()


# --- BANK_CARD: 16-19 digits starting with 3-6, Luhn-valid, either one run or grouped in 4s by one separator kind.
# A grouped number must not continue a longer grouped sequence ("1234 5678 ... 9012 3456" keys, serials).
_BANK_CARD = re.compile(_start("3-6") + r"(?:[0-9]{15,18}|(?<![0-9][ -].)[0-9]{3}(?P<sep>[ -])[0-9]{4}"
                        r"(?:(?P=sep)[0-9]{4}){2}(?:(?P=sep)[0-9]{1,3})?(?![ -][0-9]))" + _NOT_BEFORE)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _bank_cards(text: str, pos: int) -> Iterator[tuple[int, int]]:
    for m in _BANK_CARD.finditer(text, pos):
        if _luhn_valid(m.group().replace(" ", "").replace("-", "")):
            yield m.span()


# --- PASSPORT: Chinese passports: E/G/D/S/P + 8 digits, E + letter (no I/O) + 7 digits, DE/SE/PE + 7 digits.
_PASSPORT = re.compile(_start("DEGPS") + r"(?:[0-9]{8}|(?<=E)[A-HJ-NP-Z][0-9]{7}|(?<=[DSP])E[0-9]{7})" + _NOT_BEFORE)


def _passports(text: str, pos: int) -> Iterator[tuple[int, int]]:
    for m in _PASSPORT.finditer(text, pos):
        yield m.span()


# --- IP: IPv4 with octets 0-255 without leading zeros, not inside a longer dotted run (1.2.3.4.5) and not right after
# "version"/"版本". IPv6: a run of hex digits, colons and dots around a "::" or ":x:" (so 12:30 is never one) that
# the ipaddress module accepts and that holds a digit (so C++-ish "dead::beef" stays).
# IPv4 is searched from its "d.d.d" tail: a literal "." lets the regex engine skip ahead fast (5x faster than
# trying every digit), and the full pattern is then matched from the digits before the first dot.
_IPV4_TAIL = re.compile(r"\.(?<=[0-9]\.)[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
_IPV4 = re.compile(r"(?<![0-9A-Za-z.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9A-Za-z]|\.[0-9])")
_VERSION_BEFORE = re.compile(r"(?:版本号?|version|ver\.?)\s*[:：]?\s*$", re.IGNORECASE)
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_IPV6_RUN = re.compile(r"[0-9A-Fa-f:.]*")
_DIGITS = frozenset("0123456789")
_ASCII_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _ips(text: str, pos: int) -> Iterator[tuple[int, int]]:
    if text.count(".") >= 3:
        for tail in _IPV4_TAIL.finditer(text, pos):
            start = tail.start()
            while start > 0 and text[start - 1] in _DIGITS and tail.start() - start < 3:
                start -= 1
            m = _IPV4.match(text, start)
            if m and all(int(o) <= 255 and (o[0] != "0" or o == "0") for o in m.group().split(".")) and \
                    not _VERSION_BEFORE.search(text, max(0, start - 12), start):
                yield m.span()
    if text.count(":") >= 2:
        yield from _ipv6s(text, pos)


def _ipv6s(text: str, position: int) -> Iterator[tuple[int, int]]:
    while hint := _IPV6_HINT.search(text, position):
        start = hint.start()
        while start > 0 and text[start - 1] in _IPV6_CHARS:
            start -= 1
        end = _IPV6_RUN.match(text, start).end()
        position = end
        while text[end - 1] == ".":  # a sentence's full stop
            end -= 1
        candidate = text[start:end]
        if (start == 0 or text[start - 1] not in _ASCII_ALNUM) and (end == len(text) or text[end] not in _ASCII_ALNUM) \
                and not candidate.startswith(".") and any(c.isdigit() for c in candidate) and _is_ipv6(candidate):
            yield start, end


def _is_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


# --- SECRET_URL: a URL whose query or fragment has a non-empty parameter named like a credential, or whose
# authority carries user:password@. The whole URL goes: any part of it may be what makes the secret usable.
_URL = re.compile(_start("HhFfWw") + r"(?:(?<=[Hh])[Tt][Tt][Pp][Ss]?://|(?<=[Ff])[Tt][Pp][Ss]?://|"
                  r"(?<=[Ww])(?:[Ss][Ss]?://|[Ww][Ww]\.))[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_URL_TRAILING = ".,;:!?'\"*"
# A parameter name is split into words (snake, kebab, camelCase); it is secret if a word contains a strong stem,
# or equals a short word that would be too common as a substring ("key" is in "monkey", "auth" in "author").
_SECRET_STEMS = ("token", "secret", "password", "passwd", "signature", "credential", "apikey", "accesskey", "appkey",
                 "authkey", "privatekey", "sessionid")
_SECRET_WORDS = frozenset({"key", "sig", "sign", "auth", "pwd", "pass"})
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_NAME_WORDS = re.compile(r"[^a-z0-9]+")
_AUTHORITY_END = re.compile(r"[/?#]")
_PARAM_SEPARATORS = re.compile(r"[?#&;]")


def _secret_urls(text: str, pos: int) -> Iterator[tuple[int, int]]:
    if "://" not in text and "www." not in text and "WWW." not in text:
        return
    for m in _URL.finditer(text, pos):
        url = m.group().rstrip(_URL_TRAILING)
        if url.endswith(")") and url.count(")") > url.count("("):  # "(see https://…?token=x)"
            url = url[:-1].rstrip(_URL_TRAILING)
        if _has_secret(url):
            yield m.start(), m.start() + len(url)


def _has_secret(url: str) -> bool:
    if "=" not in url and "@" not in url:
        return False
    rest = url.split("://", 1)[-1]
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        return True
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return False
    for param in _PARAM_SEPARATORS.split(rest[cut + 1:]):
        name, equals, value = param.partition("=")
        if equals and value and _is_secret_name(name):
            return True
    return False


@functools.lru_cache(maxsize=4096)  # a corpus repeats the same few parameter names
def _is_secret_name(name: str) -> bool:
    words = _NAME_WORDS.split(_CAMEL.sub(r"\1_\2", name).lower())
    return any(word in _SECRET_WORDS or any(stem in word for stem in _SECRET_STEMS) for word in words)


# A run of 7 digits, or 3 + 4 split by one separator, is part of every ID card, bank card, phone and passport match;
# each of those starts at most 6 characters before its first such run ("(0755)1234567", "+86 138 1234 5678").
_LONG_NUMBER = re.compile(r"[0-9][0-9]{2}[ -]?[0-9]{4}")  # not [0-9]{3}: a class first is faster
_NUMBER_TYPES = frozenset({"ID_CARD", "BANK_CARD", "PHONE", "PASSPORT"})
_FINDERS: dict[str, Callable[[str, int], Iterable[tuple[int, int]]]] = {
    "SECRET_URL": _secret_urls, "EMAIL": _emails, "ID_CARD": _id_cards, "BANK_CARD": _bank_cards,
    "PHONE": _phones, "PASSPORT": _passports, "IP": _ips,
}
_RANK = {name: i for i, name in enumerate(PII_TYPES)}
