"""Which language and script a text is in: CJK runs, a fast English test, and lingua (which ships its own models)
for the rest. Owns detect_language(), the candidate list and ISO 639-1 code checks. Must not filter records
(filters.py does) nor read files.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

# Runs of letters by script, for choosing n-gram units and for the language rules (runs: fewer objects to count).
_CJK_RUN = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff]+")
_KANA_RUN = re.compile("[\u3040-\u30ff]+")
_HANGUL_RUN = re.compile("[\uac00-\ud7af]+")
_LATIN_WORD = re.compile("[a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f\u1e00-\u1eff']+")  # on lower-cased text


def cjk_text(text: str) -> str:
    """The CJK characters of `text` when they dominate it, else "". One CJK character carries about as much as
    three ASCII characters (a short word), so "用pip安装numpy" counts as Chinese."""
    if text.isascii():
        return ""
    cjk = "".join(_CJK_RUN.findall(text))
    return cjk if cjk and len(cjk) * 3 >= len(text.encode("ascii", "ignore")) else ""


def is_cjk(ch: str) -> bool:
    return bool(_CJK_RUN.match(ch))


# Lingua decides between these (plus the kept languages) when the script rules below do not.
CANDIDATE_LANGUAGES = ("en", "zh", "ja", "ko", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "cs", "ro", "hu", "tr",
                       "vi", "id", "ru", "uk", "ar", "fa", "he", "hi", "th", "el")
# English function words, and frequent function words of other Latin-script languages that are not English words:
# text full of the first and free of the second is English without asking lingua (the common case, and fast).
_ENGLISH = frozenset(
    "the of and to a in is you that it for on with as was are be this have from or by not but what all were we when "
    "your can an which their if will do has would there how about so my me he she his her they them been more than "
    "some into its our just could should does did who why these those any also i it's i'm don't can't here where "
    "very because after then only other use using".split())
_NOT_ENGLISH = frozenset(
    "le la les des du une est et que qui dans pour pas sur au aux avec ce cette sont nous vous ils je il elle mais "
    "der die das und ist nicht ein eine ich du zu den dem mit von sich auf für auch es wir sie ihr wie aber oder "
    "noch wenn nach el los las del y por con para lo al se como pero su sus muy di che non gli della sono ho ha "
    "questo anche ma nel da não um uma os em com é na mas het een van niet zijn ik je dat op te wat maar ook voor "
    "och att det som är inte jag på ett med för się nie jest że yang dan itu ini dengan untuk bir ve bu".split())
_LINGUA_PREFIX = 200  # characters lingua sees: plenty for one language, and its cost grows with length


def detect_language(text: str, candidates: tuple[str, ...] = CANDIDATE_LANGUAGES,
                    accuracy: str = "high") -> str | None:
    """The ISO 639-1 code of the text's dominant language, or None when there is too little to judge by. Lingua
    chooses among `candidates` when the script rules and the English word test do not decide."""
    sample = text[:1000]
    cjk = cjk_text(sample)
    if cjk:
        if sum(map(len, _HANGUL_RUN.findall(cjk))) * 2 >= len(cjk):
            return "ko"
        kana = sum(map(len, _KANA_RUN.findall(cjk)))
        return "ja" if kana * 10 >= len(cjk) else "zh"  # Japanese has kana in nearly every sentence
    words = _LATIN_WORD.findall(sample.lower().replace("\u2019", "'"))
    letters = sum(map(len, words))
    if len(words) >= 4 and _looks_english(words, letters):
        return "en"
    if len(sample) < 40 and sum(map(str.isalpha, sample)) < 10:
        return None  # "Yes.", "OK!": any guess would be noise
    detected = _lingua_detector(frozenset(candidates), accuracy).detect_language_of(sample[:_LINGUA_PREFIX])
    return detected.iso_code_639_1.name.lower() if detected is not None else None


def _looks_english(words: list[str], letters: int) -> bool:
    joined = "".join(words)
    if not joined.isascii() and (len(joined.encode()) - letters) * 50 > letters:
        return False  # more than 2% accented letters
    english = sum(map(_ENGLISH.__contains__, words))
    foreign = sum(map(_NOT_ENGLISH.__contains__, words))
    return english * 4 >= len(words) and foreign * 20 <= len(words)


@cache
def _lingua_detector(codes: frozenset[str], accuracy: str):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in codes]
    builder = LanguageDetectorBuilder.from_languages(*languages)
    return (builder.with_low_accuracy_mode() if accuracy == "low" else builder).build()


@cache
def lingua_codes() -> tuple[str, ...]:
    from lingua import Language

    return tuple(sorted(language.iso_code_639_1.name.lower() for language in Language.all()))


def language_code(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    code = re.split(r"[-_]", value.strip().lower(), maxsplit=1)[0]  # zh-TW, zh_Hant, en-US → zh, en
    if code not in lingua_codes():
        raise ValueError(f"unknown language code {value!r}; use ISO 639-1 codes: {', '.join(lingua_codes())}")
    return code
