"""PII masking: every type is found in Chinese and English context, and look-alikes (order numbers, versions, times,
model numbers, wrong checksums) are left alone. ID and card numbers are generated here with their checksums, never
copied from real people."""

import dataclasses

import pytest

from lmforge.data.pii import PII_TYPES, PLACEHOLDERS, Match, find_pii, mask_pii
from lmforge.errors import ConfigError

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def id_number(region: str = "110105", birth: str = "19491231", seq: str = "002") -> str:
    """An 18-digit resident ID with its GB 11643 (ISO 7064 MOD 11-2) check character."""
    body = region + birth + seq
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, ID_WEIGHTS)) % 11]


def wrong_check(number: str) -> str:
    return number[:-1] + ("0" if number[-1] != "0" else "1")


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in reversed(number)]
    return (sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])) % 10 == 0


def luhn_complete(partial: str) -> str:
    """partial + the one check digit that makes it Luhn-valid."""
    return next(partial + d for d in "0123456789" if luhn_ok(partial + d))


def masked(text: str, types=None) -> str:
    return mask_pii(text, types)[0]


def test_helpers_match_published_examples():
    assert id_number() == "11010519491231002X"  # the worked example of GB 11643-1999
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


# --- ID_CARD ---

def test_id_card_in_chinese_sentence_is_masked():
    text = f"我的身份证号是{id_number()}，请保密"
    assert mask_pii(text) == ("我的身份证号是<ID_CARD>，请保密", {"ID_CARD": 1})


@pytest.mark.parametrize("number", [id_number("440305", "20000229", "123"), id_number("650102", "19000101", "001"),
                                    id_number("810000", "19991231", "456")])
def test_id_cards_with_valid_check_and_date_are_masked(number):
    assert masked(f"ID: {number}.") == "ID: <ID_CARD>."


def test_id_card_lowercase_x_is_masked():
    assert id_number()[-1] == "X"
    assert masked(f"身份证{id_number().lower()}") == "身份证<ID_CARD>"


@pytest.mark.parametrize("text", [
    f"我的身份证号是{wrong_check(id_number())}，请保密",   # wrong check digit
    f"身份证{id_number('440305', '19990229', '123')}",   # 29 Feb in a non-leap year, checksum right
    f"身份证{id_number('440305', '20991231', '123')}",   # born in the future
    f"身份证{id_number('440305', '18991231', '123')}",   # before 1900
    f"身份证{id_number('940305', '19900101', '123')}",   # region code cannot start with 9
    f"流水号{id_number()}7",                              # inside a longer number
    f"编号A{id_number()}",                                # inside a longer code
    "旧身份证110105491231002",                           # 15-digit IDs have no check digit: not matched, by choice
])
def test_id_card_look_alikes_are_kept(text):
    assert "ID_CARD" not in mask_pii(text)[1]


def test_id_card_wins_over_bank_card():
    candidates = (id_number("440305", "19900101", f"{seq:03d}") for seq in range(1000))
    number = next(n for n in candidates if n[-1] != "X" and luhn_ok(n))  # also a valid card number
    assert [m.type for m in find_pii(f"证件{number}")] == ["ID_CARD"]


# --- PHONE ---

@pytest.mark.parametrize("phone", ["13812345678", "+86 138 1234 5678", "+8613812345678", "0086-138-1234-5678",
                                   "8613812345678", "138-1234-5678", "199 0000 1111",
                                   "010-12345678", "0755-1234567", "021 87654321", "(0755)1234567",
                                   "（010）12345678", "0755-1234567转123", "010-12345678-8001"])
def test_phones_are_masked_whole(phone):
    assert mask_pii(f"电话{phone}谢谢") == ("电话<PHONE>谢谢", {"PHONE": 1})
    assert masked(f"Call {phone}, thanks") == "Call <PHONE>, thanks"


@pytest.mark.parametrize("text", [
    "订单号：20231115123456789012",   # 20-digit order number holds 13812345678-like runs
    "运单号9913812345678001",         # a mobile inside a longer digit run
    "金额12812345678元",              # 12x is no mobile prefix
    "SN13812345678",                  # part of a serial code
    "单号2023-13812345678",           # part of a dashed number
    "13812345678-22",
    "138 1234-5678",                  # mixed separators
    "075512345678",                   # landline without a separator looks like an account number: kept, by choice
    "日期2023-11-15，共1234567元",
    "0755-123456",                    # local number too short
])
def test_phone_look_alikes_are_kept(text):
    assert "PHONE" not in mask_pii(text)[1]


# --- EMAIL ---

@pytest.mark.parametrize("text, expected", [
    ("联系zhang.san@example.com谢谢", "联系<EMAIL>谢谢"),
    ("mail: a_b+tag@mail.example.com.cn.", "mail: <EMAIL>."),
    ("邮箱：13812345678@163.com", "邮箱：<EMAIL>"),       # email wins over the phone inside it
    ("Write to Li.Ming-2@Sub.Example.ORG or me", "Write to <EMAIL> or me"),
])
def test_emails_are_masked(text, expected):
    assert masked(text) == expected


@pytest.mark.parametrize("text", ["@张三 你好", "user@localhost", "a@b", "price 5@3.5元", "name@domain.c0m"])
def test_email_look_alikes_are_kept(text):
    assert "EMAIL" not in mask_pii(text)[1]


# --- BANK_CARD ---

UNIONPAY_19 = luhn_complete("622202020000000000")
VISA_16 = luhn_complete("411111111111111")


@pytest.mark.parametrize("card", [
    UNIONPAY_19,
    " ".join([UNIONPAY_19[i:i + 4] for i in range(0, 19, 4)]),   # 6222 0202 0000 0000 00x
    "-".join([VISA_16[i:i + 4] for i in range(0, 16, 4)]),
    VISA_16,
    luhn_complete("353011133330000"),                             # JCB-style, 16 digits
])
def test_luhn_valid_cards_are_masked(card):
    assert mask_pii(f"卡号{card}，开户行") == ("卡号<BANK_CARD>，开户行", {"BANK_CARD": 1})


@pytest.mark.parametrize("text", [
    f"卡号{VISA_16[:-1]}{(int(VISA_16[-1]) + 1) % 10}",       # Luhn-invalid
    f"编号{luhn_complete('711111111111111')}",                # valid Luhn, but no card starts with 7
    f"订单{luhn_complete('6222020200000000001')}",            # 20 digits: longer than any card
    f"流水{UNIONPAY_19}88",                                   # inside a longer digit run
    "序列号 1234 " + " ".join([VISA_16[i:i + 4] for i in range(0, 16, 4)]),  # inside a longer grouped run
    "订单号：20231115123456789012",
])
def test_bank_card_look_alikes_are_kept(text):
    assert "BANK_CARD" not in mask_pii(text)[1]


# --- IP ---

@pytest.mark.parametrize("text, expected", [
    ("服务器IP是192.168.1.1，端口22", "服务器IP是<IP>，端口22"),
    ("from 10.0.0.255.", "from <IP>."),
    ("see http://172.16.0.1:8080/admin", "see http://<IP>:8080/admin"),   # a URL without secrets keeps the rest
    ("地址2001:db8::1可以访问", "地址<IP>可以访问"),
    ("fe80::1ff:fe23:4567:890a is link-local", "<IP> is link-local"),
    ("mapped ::ffff:192.0.2.1 ok", "mapped <IP> ok"),
    ("full 2001:0db8:0000:0000:0000:ff00:0042:8329", "full <IP>"),
])
def test_ips_are_masked(text, expected):
    assert masked(text) == expected


@pytest.mark.parametrize("text", [
    "版本 1.2.3.4.5", "版本1.2.3.4", "version 10.0.19041.1", "v1.2.3.4", "256.1.1.1", "1.2.3",
    "会议 12:30", "时间 12:30:45", "MAC 00:1A:2B:3C:4D:5E", "std::vector", "dead::beef", "比例 3:2:1",
])
def test_ip_look_alikes_are_kept(text):
    assert "IP" not in mask_pii(text)[1]


# --- PASSPORT ---

@pytest.mark.parametrize("passport", ["E12345678", "EA1234567", "G12345678", "DE1234567", "P87654321"])
def test_passports_are_masked(passport):
    assert mask_pii(f"护照号{passport}，有效期") == ("护照号<PASSPORT>，有效期", {"PASSPORT": 1})


@pytest.mark.parametrize("text", ["型号E123456789X", "E1234567", "ABE12345678", "e12345678", "EI1234567",
                                  "E12345678A", "零件E123456789"])
def test_passport_look_alikes_are_kept(text):
    assert "PASSPORT" not in mask_pii(text)[1]


# --- SECRET_URL ---

@pytest.mark.parametrize("url", [
    "https://api.example.com/v1/data?id=3&access_token=abc123",
    "http://example.com/?token=xyz",
    "https://s3.amazonaws.com/b/k?X-Amz-Credential=A%2F1&X-Amz-Signature=f00d",
    "https://maps.example.com/api?apiKey=k1&q=x",
    "https://pay.example.cn/notify?order=1&sign=9f8e",
    "https://example.com/cb#access_token=tok&state=1",
    "https://bob:hunter2@example.com/repo",
    "www.example.com/login?user=a&password=p",
    "HTTPS://EXAMPLE.COM/?API_KEY=1",
    "https://example.com/dl?file=a.pdf&contact=a@b.com&secret=1",   # the email goes with the URL
])
def test_urls_with_secrets_are_replaced_whole(url):
    assert mask_pii(f"链接{url}，请勿外传") == ("链接<SECRET_URL>，请勿外传", {"SECRET_URL": 1})


def test_secret_url_keeps_sentence_punctuation():
    assert masked("See https://x.com/a?token=abc.") == "See <SECRET_URL>."
    assert masked("(see https://x.com/a?token=abc)") == "(see <SECRET_URL>)"


@pytest.mark.parametrize("url", [
    "https://example.com/search?q=keyword&page=2",
    "https://example.com/zoo?animal=monkey&author=lu",
    "https://example.com/?token=",
    "https://example.com/tokens/list",
])
def test_urls_without_secrets_are_kept(url):
    assert masked(f"链接{url}，谢谢") == f"链接{url}，谢谢"


# --- the API ---

def test_counts_per_type():
    text = (f"张三，身份证{id_number()}，手机13812345678，座机010-12345678，邮箱zs@example.com，"
            f"卡号{UNIONPAY_19}，护照E12345678，IP 10.1.2.3，链接https://x.com/?key=1")
    result, counts = mask_pii(text)
    assert counts == {"ID_CARD": 1, "PHONE": 2, "EMAIL": 1, "BANK_CARD": 1, "PASSPORT": 1, "IP": 1, "SECRET_URL": 1}
    assert result == ("张三，身份证<ID_CARD>，手机<PHONE>，座机<PHONE>，邮箱<EMAIL>，卡号<BANK_CARD>，护照<PASSPORT>，"
                      "IP <IP>，链接<SECRET_URL>")
    assert mask_pii(result) == (result, {})  # masking is idempotent


def test_types_restricts_what_is_masked():
    text = "手机13812345678，邮箱zs@example.com，IP 10.1.2.3"
    assert mask_pii(text, types=["EMAIL"]) == ("手机13812345678，邮箱<EMAIL>，IP 10.1.2.3", {"EMAIL": 1})
    assert mask_pii(text, types={"PHONE", "IP"})[1] == {"PHONE": 1, "IP": 1}
    assert mask_pii(text, types="PHONE")[1] == {"PHONE": 1}
    assert mask_pii(text, types=[]) == (text, {})


def test_restricted_types_do_not_let_a_weaker_type_take_over():
    # With EMAIL off, the phone-shaped local part of an email is a phone: types select, they do not re-rank.
    assert masked("13812345678@163.com", types=["PHONE"]) == "<PHONE>@163.com"


def test_unknown_type_is_a_user_error_with_a_hint():
    with pytest.raises(ConfigError, match=r"'phone'.*did you mean 'PHONE'"):
        mask_pii("x", types=["phone"])


def test_find_pii_reports_spans_in_text_order():
    text = "邮箱zs@example.com，手机13812345678"
    found = find_pii(text)
    assert found == [Match("EMAIL", 2, 16, "zs@example.com"), Match("PHONE", 19, 30, "13812345678")]
    assert all(text[m.start:m.end] == m.text for m in found)
    with pytest.raises(dataclasses.FrozenInstanceError):
        found[0].type = "IP"


def test_types_and_placeholders():
    assert set(PII_TYPES) == {"ID_CARD", "PHONE", "EMAIL", "BANK_CARD", "IP", "PASSPORT", "SECRET_URL"}
    assert PLACEHOLDERS == {name: f"<{name}>" for name in PII_TYPES}
    # overlap priority: a URL over what is inside it, an ID over card and phone shapes, a card over a phone
    rank = PII_TYPES.index
    assert rank("SECRET_URL") < rank("EMAIL") and rank("ID_CARD") < rank("BANK_CARD") < rank("PHONE")


def test_text_without_pii_is_returned_unchanged():
    text = "根据《劳动合同法》第39条，2023年11月15日起算，共计45000元。Version 1.2.3 at 12:30; see https://example.com."
    result, counts = mask_pii(text)
    assert result is text and counts == {}
