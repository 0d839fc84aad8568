"""The image teacher's pure parts: image parts in order, placeholder ranges collapsed."""

from __future__ import annotations

import pytest

from nextstate.learner.image_teacher import collapse_placeholders, image_urls
from nextstate.learner.teacher import TeacherError

IMG = 9


def test_image_urls_are_taken_in_prompt_order() -> None:
    messages = [
        {"role": "system", "content": "You drive a GUI."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "go"}]},
        {"role": "assistant", "content": "click(1, 2)"},
        {"role": "user", "content": [{"type": "text", "text": "now"},
                                     {"type": "image_url", "image_url": "data:b"}]},
    ]
    assert image_urls(messages) == ["data:a", "data:b"]
    with pytest.raises(TeacherError, match="without a URL"):
        image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_each_expanded_range_becomes_one_placeholder() -> None:
    ids = [1, 2, 5, IMG, IMG, 6, 3, 5, IMG, 6, 4]
    ranges = [{"offset": 7, "length": 3}, {"offset": 2, "length": 4}]  # any order
    assert collapse_placeholders(ids, ranges, IMG) == [1, 2, IMG, 3, IMG, 4]
    assert collapse_placeholders(ids, [], IMG) == ids


@pytest.mark.parametrize("ranges", [
    [{"offset": 2, "length": 4}, {"offset": 4, "length": 2}],  # overlapping
    [{"offset": 10, "length": 5}],                             # past the end
    [{"offset": 1, "length": 0}],                              # empty
])
def test_ranges_out_of_place_are_refused(ranges: list[dict[str, int]]) -> None:
    with pytest.raises(TeacherError, match="out of place"):
        collapse_placeholders(list(range(11)), ranges, IMG)
