"""The data layer: the synthetic people (determinism, splits, renderings), the loaders on small
fixtures in the user formats and the TOFU, MUSE and WMDP schemas, bad input, and the offline
failure of a hub name."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import socket

import pytest

from zounlearn.unlearning import (
    DataError,
    Example,
    Split,
    UnlearningData,
    load_examples,
    load_muse,
    load_tofu,
    load_wmdp,
    synthetic_data,
    synthetic_people,
)
from zounlearn.unlearning.synthetic import VOCABULARY, choice_questions, questions, sentences

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"


def _dump(data: UnlearningData) -> str:
    return json.dumps(dataclasses.asdict(data), sort_keys=True)


# --- the synthetic people


def test_same_seed_same_bytes_other_seed_other_data():
    first = _dump(synthetic_data(seed=7))
    assert _dump(synthetic_data(seed=7)) == first
    assert _dump(synthetic_data(seed=8)) != first
    assert synthetic_people(seed=7) != synthetic_people(seed=8)


def test_global_random_state_does_not_matter():
    import random

    random.seed(1)
    first = _dump(synthetic_data(seed=3, n_people=20))
    random.seed(2)
    assert _dump(synthetic_data(seed=3, n_people=20)) == first


@pytest.mark.parametrize("n_people, fraction, n_holdout, sizes", [
    (100, 0.1, None, (10, 90, 10)),
    (50, 0.2, 3, (10, 40, 3)),
    (30, 0.1, 0, (3, 27, 0)),
])
def test_split_sizes_and_disjoint_people(n_people, fraction, n_holdout, sizes):
    people = synthetic_people(seed=0, n_people=n_people, forget_fraction=fraction, n_holdout=n_holdout)
    groups = (people.forget, people.retain, people.holdout)
    assert tuple(map(len, groups)) == sizes
    names = [p.name for group in groups for p in group]
    assert len(set(names)) == len(names)
    data = synthetic_data(seed=0, n_people=n_people, forget_fraction=fraction, n_holdout=n_holdout)
    assert len(data.forget.qa) == 5 * sizes[0] and len(data.retain.choice) == 5 * sizes[1]
    assert (data.holdout is None) == (sizes[2] == 0)
    for split, group in zip((data.forget, data.retain, data.holdout), groups):
        if split is not None:  # each split speaks only of its own people
            assert {q.prompt for q in split.qa} == {q.prompt for p in group for q in questions(p)}


def test_every_answer_is_in_the_persons_sentences():
    people = synthetic_people(seed=5, n_people=40)
    for person in people.forget + people.retain + people.holdout:
        texts = [e.answer for e in sentences(person)]
        assert len(texts) == 15 and len(set(texts)) == 15 and all(e.prompt == "" for e in sentences(person))
        for question in questions(person):
            assert person.name in question.prompt
            # every paraphrase of the fact holds the answer (3 templates per fact)
            assert sum(question.answer in t for t in texts) >= 3, (question, texts)


def test_four_choices_one_correct_distractors_from_the_field():
    people = synthetic_people(seed=2, n_people=40)
    positions = set()
    for person in people.forget + people.retain:
        for (field, value), mc in zip(person.facts().items(), choice_questions(person, seed=2)):
            assert len(mc.choices) == 4 and len(set(mc.choices)) == 4
            assert mc.choices[mc.correct] == value == mc.answer
            assert [c == value for c in mc.choices].count(True) == 1
            assert set(mc.choices) <= set(VOCABULARY[field])
            positions.add(mc.correct)
    assert positions == {0, 1, 2, 3}  # the order is drawn, not fixed


@pytest.mark.parametrize("kwargs, message", [
    ({"n_people": 4, "forget_fraction": 0.1}, "forget set is empty"),
    ({"forget_fraction": 0.0}, "forget_fraction must be between 0 and 1"),
    ({"n_people": 570, "n_holdout": 10}, "at most 576"),
])
def test_bad_synthetic_settings(kwargs, message):
    with pytest.raises(DataError, match=message):
        synthetic_data(**kwargs)


# --- the representation


def test_representation_checks_itself():
    assert Example("", "a text").kind == "text" and Example("q?", "a").kind == "qa"
    mc = Example("q?", "b", ["a", "b"], 1)
    assert mc.kind == "choice" and mc.choices == ("a", "b")
    with pytest.raises(DataError, match="not choices\\[0\\]"):
        Example("q?", "b", ("a", "b"), 0)
    with pytest.raises(DataError, match="answer index 2 is out of range for 2 choices"):
        Example("q?", "b", ("a", "b"), 2)
    with pytest.raises(DataError, match="qa examples"):
        Split("forget", qa=(Example("", "a text"),))
    split = Split.from_examples("retain", [Example("", "t"), Example("q?", "a"), mc])
    assert len(split.train) == 2 and len(split.qa) == 1 and split.choice == (mc,)
    with pytest.raises(DataError, match="the forget set is empty"):
        UnlearningData(Split.from_examples("forget", [mc]), split)


# --- loaders, user formats


def test_jsonl_json_csv_text():
    assert load_examples(FIXTURES / "text.jsonl") == (Example("", "Mira Kestrane was born in Oslo."),
                                                      Example("", "Rafe Umberley plays the harp."))
    qa = load_examples(FIXTURES / "qa.jsonl")  # a blank line is skipped
    assert qa == (Example("Where was Mira Kestrane born?", "Oslo"),
                  Example("What does Rafe Umberley play?", "the harp"))
    assert load_examples(FIXTURES / "array.json") == qa[:1]
    csv_qa = load_examples(str(FIXTURES / "qa.csv"))
    assert csv_qa[0] == Example("Where, exactly, was Mira Kestrane born?", "Oslo") and csv_qa[1] == qa[1]
    for name in ("choice.jsonl", "choice.csv"):  # int / digit-string index, or the choice's text
        mc = load_examples(FIXTURES / name)
        assert mc[0] == Example("Where was Mira Kestrane born?", "Oslo", ("Lima", "Oslo", "Cairo", "Perth"), 1)
        assert mc[1].choices == ("harp", "oboe") and mc[1].correct == (0 if name.endswith("jsonl") else 1)
    lines = load_examples(FIXTURES / "lines.txt")
    assert [e.answer for e in lines] == ["Mira Kestrane was born in Oslo.", "Rafe Umberley plays the harp.",
                                         "He learned it in Lima."]
    paragraphs = load_examples(FIXTURES / "paragraphs.txt", text_unit="paragraph")
    assert [e.answer for e in paragraphs] == ["Mira Kestrane was born in Oslo.\nShe is a pilot.",
                                              "Rafe Umberley plays the harp.\nHe learned it in Lima."]


def test_field_mapping():
    renamed = load_examples(FIXTURES / "renamed.jsonl", fields={"question": "prompt", "answer": "response"})
    assert renamed == (Example("Where was Mira Kestrane born?", "Oslo"),)
    with pytest.raises(DataError, match="unknown field name 'quesiton'.*text, question, answer, choices"):
        load_examples(FIXTURES / "renamed.jsonl", fields={"quesiton": "prompt"})
    with pytest.raises(DataError, match=r"no field 'query' \(given for 'question'\); its fields are prompt, resp"):
        load_examples(FIXTURES / "renamed.jsonl", fields={"question": "query"})


def test_hugging_face_datasets_directories(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"question": "Where was Mira Kestrane born?", "answer": "Oslo"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_examples(tmp_path / "one") == (Example(*rows[0].values()),)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    assert load_examples(tmp_path / "qa.parquet") == (Example(*rows[0].values()),)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list([{"text": "t"}])}).save_to_disk(str(tmp_path / "two"))
    assert load_examples(tmp_path / "two", split="test") == (Example("", "t"),)
    with pytest.raises(DataError, match="has the splits train, test; choose one with split="):
        load_examples(tmp_path / "two")
    # a directory datasets.load_dataset reads (data files, no save_to_disk metadata)
    assert load_examples(FIXTURES / "muse" / "knowmem")[0] == Example("Which river flooded the town in the report?",
                                                                       "the Severn")


# --- loaders, benchmark schemas


def test_tofu():
    forget = load_tofu(FIXTURES / "tofu", "forget10")
    assert len(forget) == 2 and forget[1] == Example("What genre does Jaime Vasquez write in?",
                                                     "Jaime Vasquez writes true crime.")
    assert len(load_tofu(FIXTURES / "tofu", "retain90")) == 3 and len(load_tofu(FIXTURES / "tofu", "holdout10")) == 1
    with pytest.raises(DataError, match="tofu holds no config 'retain95': looked for retain95/train, retain95, train"):
        load_tofu(FIXTURES / "tofu", "retain95")
    with pytest.raises(DataError, match="not in the TOFU \\(question, answer\\) schema"):
        load_tofu(FIXTURES / "text.jsonl")


def test_tofu_save_to_disk_copy_checks_its_config(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIXTURES / "tofu" / "forget10.json").read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)
    train.info.config_name = "forget10"  # as load_dataset("locuslab/TOFU", "forget10") records it
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "tofu"))
    assert load_tofu(tmp_path / "tofu", "forget10") == load_tofu(FIXTURES / "tofu", "forget10")
    with pytest.raises(DataError, match="holds the config 'forget10', not 'retain90'"):
        load_tofu(tmp_path / "tofu", "retain90")


def test_muse():
    knowmem = load_muse(FIXTURES / "muse", "knowmem", split="forget_qa")
    assert knowmem[1] == Example("How many homes were evacuated?", "120")
    assert load_muse(FIXTURES / "muse", "knowmem", split="retain_qa") == (Example("Who opened the new library?",
                                                                                  "the mayor"),)
    verbmem = load_muse(FIXTURES / "muse", "verbmem", split="forget")
    assert verbmem[0].prompt.endswith("as the") and verbmem[0].answer.startswith(" river rose")
    raw = load_muse(FIXTURES / "muse", "raw", split="forget")
    assert raw[0].kind == "text" and "\n\n" in raw[0].answer
    data = UnlearningData(Split.from_examples("forget", raw + knowmem), Split("retain"),
                          Split.from_examples("holdout", load_muse(FIXTURES / "muse", "raw", split="holdout")))
    assert len(data.forget.train) == 3 and len(data.forget.qa) == 2
    with pytest.raises(DataError, match="unknown MUSE config 'knowmen'; use one of raw"):
        load_muse(FIXTURES / "muse", "knowmen")
    with pytest.raises(DataError, match="not in the MUSE verbmem \\(prompt, gt\\) schema"):
        load_muse(FIXTURES / "muse" / "knowmem" / "forget_qa.jsonl", "verbmem")


def test_muse_hub_clone_layout(tmp_path, monkeypatch):
    """A git clone of a hub repository: its README names the configs for datasets.load_dataset."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(FIXTURES / "muse" / "knowmem", tmp_path / "clone" / "knowmem")
    (tmp_path / "clone" / "README.md").write_text(
        "---\nconfigs:\n- config_name: knowmem\n  data_files:\n"
        "  - split: forget_qa\n    path: knowmem/forget_qa.jsonl\n"
        "  - split: retain_qa\n    path: knowmem/retain_qa.jsonl\n---\n")
    assert load_muse(tmp_path / "clone", "knowmem", split="retain_qa") == load_muse(FIXTURES / "muse", "knowmem",
                                                                                    split="retain_qa")


def test_wmdp():
    questions_ = load_wmdp(FIXTURES / "wmdp")
    assert [q.correct for q in questions_] == [2, 0] and questions_[0].answer == "Zorbavirus"
    assert all(len(q.choices) == 4 for q in questions_)
    with pytest.raises(DataError, match="not in the WMDP"):
        load_wmdp(FIXTURES / "qa.jsonl")


# --- bad input


@pytest.mark.parametrize("name, message", [
    ("json_line3.jsonl", r"json_line3.jsonl line 3: invalid JSON \(.*\); each line must be one JSON object"),
    ("empty.jsonl", "holds no examples"),
    ("not_object.jsonl", "line 1 is a JSON list, not an object"),
    ("no_fields.jsonl", "has none of the fields text, question.*its fields are body, id; name yours with fields="),
    ("missing_answer.jsonl", "line 2 has no field 'answer'; its fields are question"),
    ("choices_not_list.jsonl", "line 1: choices must be a list of at least 2 strings, got 'Oslo or Lima'"),
    ("choices_one.jsonl", r"choices must be a list of at least 2 strings, got \['Oslo'\]"),
    ("choices_not_strings.jsonl", r"choices must be a list of at least 2 strings, got \[1970, 1971\]"),
    ("index_out_of_range.jsonl", "answer index 4 is out of range for 4 choices; use 0 to 3"),
    ("answer_not_choice.jsonl", "answer 'Bergen' is neither an index nor one of the choices"),
    ("empty_answer.jsonl", "'answer' is empty; remove the row or fill it in"),
    ("answer_not_string.jsonl", "'answer' must be a string, got int 1970"),
    ("ragged.csv", "ragged.csv line 2: 2 columns in the header, a different number in this row"),
    ("latin1.txt", "is not UTF-8 text"),
    ("data.xml", "unknown file type '.xml'; use one of .jsonl, .json, .csv, .txt, .parquet"),
])
def test_malformed_fixture(name, message):
    with pytest.raises(DataError, match=message) as info:
        load_examples(BAD / name)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_missing_file_and_bad_options():
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory; check the path"):
        load_examples(FIXTURES / "nope.jsonl")
    with pytest.raises(DataError, match="text_unit must be 'line' or 'paragraph'"):
        load_examples(FIXTURES / "lines.txt", text_unit="sentence")


def test_hub_name_offline_fails_with_a_way_out(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # datasets and huggingface_hub read these variables at import: set the flags they derived too.
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args)
        raise OSError("the test forbids the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataError) as info:
        load_tofu("locuslab/TOFU", "forget10")
    message = str(info.value)
    assert "could not load locuslab/TOFU [forget10] [train] from the Hugging Face hub" in message
    assert "no local file or directory has that name" in message
    assert "datasets.load_dataset('locuslab/TOFU', 'forget10').save_to_disk(DIR)" in message
    assert "\n" not in message and not lookups
