"""BM25 over lessons, scoped to who asks (core/retrieval.py)."""

from nextstate.core.retrieval import Doc, LessonIndex, similarity, terms

APPLES = "Ben has 3 apples and buys 2 more. How many apples does Ben have now?"


def doc(i, text, scope=(None, "alice"), context="", **more):
    return Doc(id=str(i), scope=scope, text=text, context=context, **more)


def test_terms_drop_case_stop_words_and_plurals():
    assert terms("How many Apples does Ben have?") == ["many", "apple", "ben"]
    assert similarity(terms("show the steps"), terms("Show the steps!")) == 1.0
    assert similarity([], ["a"]) == 0.0


def test_the_lesson_learned_on_a_request_like_this_one_ranks_first():
    index = LessonIndex([
        doc(1, "Show the steps.", context="Zoe has 4 apples and buys 5 more."),
        doc(2, "Answer in French.", context="Translate the weather report."),
        doc(3, "Use metric units.", context="How far is Paris from Rome?"),
    ])
    found = index.search(APPLES, None, "alice", k=3)
    assert [d.id for d in found] == ["1"]  # the others share no word with the request


def test_a_request_sees_its_users_its_tenants_and_shared_lessons_only():
    index = LessonIndex([
        doc(1, "apples: mine", scope=("t", "t:alice")),
        doc(2, "apples: tenant", scope=("t", None)),
        doc(3, "apples: shared", scope=(None, None)),
        doc(4, "apples: another user", scope=("t", "t:bob")),
        doc(5, "apples: another tenant", scope=("u", "u:alice")),
    ])
    assert {d.id for d in index.search(APPLES, "t", "t:alice", k=9)} == {"1", "2", "3"}
    assert {d.id for d in index.search(APPLES, "t", "t", k=9)} == {"2", "3"}
    assert {d.id for d in index.search(APPLES, None, None, k=9)} == {"3"}


def test_pinned_lessons_come_first_whatever_the_request_and_k_bounds_all():
    index = LessonIndex([doc(1, "apples apples"), doc(2, "Always answer politely.",
                                                      pinned=True), doc(3, "apples more")])
    assert [d.id for d in index.search("Something else entirely", None, "alice")] == ["2"]
    assert [d.id for d in index.search(APPLES, None, "alice", k=2)][0] == "2"
    assert len(index.search(APPLES, None, "alice", k=2)) == 2


def test_a_scope_keeps_its_newest_lessons_and_its_pinned_ones():
    docs = [doc(i, f"apples {i}") for i in range(5)] + [doc(9, "old rule", pinned=True)]
    index = LessonIndex(docs, per_scope=3)
    assert index.size == 3
    assert [d.id for d in index.search(APPLES, None, "alice", k=9)] == ["9", "0", "1"]
