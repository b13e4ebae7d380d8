import pytest

from llmops_jupyter.core.pii import contains_pii, scrub


@pytest.mark.parametrize("text, expected", [
    ("mail alice@example.com now", "mail [EMAIL] now"),
    ("call +1 555 123 4567.", "call [PHONE]."),
    ("call (030) 1234-5678", "call [PHONE]"),
    ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("ssn 123-45-6789", "ssn [SSN]"),
    ("from 192.168.1.20.", "from [IP]."),
    ("v6 2001:db8::1 here", "v6 [IP] here"),
])
def test_scrubs(text, expected):
    assert scrub(text)[0] == expected


@pytest.mark.parametrize("text", [
    "In 2024 we sold 12 items for 3.50 each.", "version 1.2.3", "not a card 1234 5678 9012 3456",
    "999.1.1.1 is not an address", "at 10:30:45 today", "order #12345",
])
def test_leaves_ordinary_text_alone(text):
    assert scrub(text)[0] == text and not contains_pii(text)


def test_counts_per_type():
    _, counts = scrub("a@b.co, c@d.org and 4111111111111111")
    assert counts == {"EMAIL": 2, "CARD": 1}
