"""The proxy's settings: backend URLs as people write them."""

import pytest

from nextstate.core.paths import backend_root
from nextstate.proxy.settings import ProxySettings


@pytest.mark.parametrize("given, root", [
    ("http://h:8000", "http://h:8000"),
    ("http://h:8000/", "http://h:8000"),
    ("http://h:8000/v1", "http://h:8000"),  # the OPENAI_BASE_URL form
    ("http://h:8000/v1/", "http://h:8000"),
    (" https://gpu1.internal/vllm/v1 ", "https://gpu1.internal/vllm"),  # behind a prefix
    ("http://user:pw@h:8000/v1", "http://user:pw@h:8000"),
])
def test_a_backend_url_is_taken_with_or_without_v1(given, root):
    assert backend_root(given) == root


@pytest.mark.parametrize("given", ["h:8000", "localhost:8000/v1", "ftp://h", "http://",
                                   "http://h:8000/v1?x=1", ""])
def test_what_is_not_a_backend_url_is_refused_in_one_sentence(given):
    with pytest.raises(ValueError, match="e.g. http://127.0.0.1:8000"):
        backend_root(given)


def test_settings_normalise_every_backend():
    settings = ProxySettings(backends=("http://a:1/v1/", "http://b:2/v1"))
    assert settings.backends == ("http://a:1", "http://b:2")
