"""The continual-learning data stays sound: the committed files are what configs/tasks/generate_continual.py
writes, held-out questions never reach the training data, each answer can be told from the others of its kind,
the instruction checkers accept and reject what they should, and both tasks load offline through lm-eval."""

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "configs" / "tasks"
GENERATOR = TASKS / "generate_continual.py"
SFT = ROOT / "configs" / "continual" / "handbook_sft.jsonl"
SDFT = ROOT / "configs" / "continual" / "handbook_sdft.jsonl"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


generator = _module(GENERATOR, "opd_generate_continual")
qa_utils = _module(TASKS / "handbook_qa" / "utils.py", "opd_handbook_qa_utils")
if_utils = _module(TASKS / "ifeval_lite" / "utils.py", "opd_ifeval_lite_utils")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


QA_DOCS = _rows(TASKS / "handbook_qa" / "test.jsonl") + _rows(TASKS / "handbook_qa" / "train.jsonl")


def test_committed_files_are_what_the_generator_writes():
    res = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_check_names_a_stale_file_in_one_line(monkeypatch, tmp_path, capsys):
    stale = tmp_path / "handbook_qa"
    stale.mkdir()
    monkeypatch.setattr(generator, "ROOT", tmp_path)
    monkeypatch.setattr(generator, "QA_DIR", stale)
    (stale / "train.jsonl").write_text("{}\n")
    assert generator.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("handbook_qa/train.jsonl is stale") and len(err.strip().splitlines()) == 1


def test_heldout_questions_never_reach_the_training_data():
    assert len(QA_DOCS) == len(generator.handbook_facts(generator.random.Random(generator.SEED)))
    sft_text = SFT.read_text(encoding="utf-8") + SDFT.read_text(encoding="utf-8")
    for doc in QA_DOCS:
        assert doc["question"] != doc["train_question"], doc["id"]
        assert json.dumps(doc["question"])[1:-1] not in sft_text, doc["id"]
        assert doc["answer"] in doc["fact"] and doc["answer"] in doc["answer_sentence"], doc["id"]
    test_ids = {d["id"] for d in _rows(TASKS / "handbook_qa" / "test.jsonl")}
    train_ids = {d["id"] for d in _rows(TASKS / "handbook_qa" / "train.jsonl")}
    assert not test_ids & train_ids


def test_answers_of_one_template_are_told_apart():
    by_template = defaultdict(list)
    for doc in QA_DOCS:
        by_template[doc["template"]].append(doc["answer"])
    assert len(by_template) >= 15
    for template, answers in by_template.items():
        assert len(set(answers)) == len(answers), template
        for a in answers:
            for b in answers:
                assert qa_utils.answer_match(a, b) == (a == b), (template, a, b)


def test_sft_has_a_paragraph_and_a_chat_turn_per_fact():
    rows = _rows(SFT)
    texts = [r for r in rows if "text" in r]
    chats = [r for r in rows if "messages" in r]
    assert len(texts) == len(chats) == len(QA_DOCS) and len(rows) == 2 * len(QA_DOCS)
    by_question = {d["train_question"]: d for d in QA_DOCS}
    for chat in chats:
        user, assistant = chat["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == by_question[user["content"]]["answer_sentence"]
    facts = {d["fact"] for d in QA_DOCS}
    assert sum(any(f in t["text"] for f in facts) for t in texts) == len(texts)
    sdft = _rows(SDFT)
    assert {r["id"] for r in sdft} == {d["id"] for d in QA_DOCS}
    assert all(set(r) == {"id", "prompt", "fact", "reference"} for r in sdft)


@pytest.mark.parametrize(
    "generation, answer, matched",
    [
        ("The approver is Ines Varga.", "Ines Varga", True),
        ("the approver is INES   varga", "Ines Varga", True),
        ("The approver is Odile Framsby.", "Ines Varga", False),
        ("It is on floor 17.", "17", True),
        ("It is on floor 17.", "7", False),
        ("It is on floor 170.", "17", False),
        ("The budget is 1,450 euros.", "1450", True),
        ("The hackathon is on the 14th March.", "14 March", True),
        ("They wear teal-coloured badges.", "teal", True),
        ("Go to the main chamber.", "amber", False),
        ("The code is QM-4821!", "QM-4821", True),
        ("", "Brindle", False),
    ],
)
def test_handbook_answer_match(generation, answer, matched):
    assert qa_utils.process_results({"answer": answer}, [generation]) == {"answer_match": float(matched)}


# kind: (args, a response that keeps the rule, one that breaks it)
RULE_CASES = {
    "lowercase": ({}, "all quiet here, thanks.", "All quiet here."),
    "uppercase": ({}, "ALL QUIET HERE, 42 TIMES.", "ALL QUIET hERE."),
    "max_words": ({"n": 5}, "Just four words here.", "This answer has five words."),
    "min_words": ({"n": 5}, "This answer has five words.", "Only four words here."),
    "include_word": ({"word": "river"}, "We walked by the River at dusk.", "We walked by the riverside."),
    "no_commas": ({}, "Plain and simple.", "Plain, simple."),
    "end_phrase": ({"phrase": "Hope this helps."}, "Drink water. Hope this helps.", "Hope this helps. Bye."),
    "start_word": ({"word": "Well"}, "Well, it depends.", "Oh well, it depends."),
    "bullets": ({"n": 2}, "Tips:\n* sleep\n* eat", "* sleep\n* eat\n* walk"),
    "quotation": ({}, '"Autumn is best."', '"Autumn" is best.'),
    "title": ({}, "<<Autumn>>\nLeaves fall.", "<Autumn>\nLeaves fall."),
}


def test_every_rule_kind_has_a_checker_and_a_case():
    assert set(generator.RULE_KINDS) == set(if_utils.CHECKERS) == set(RULE_CASES)


@pytest.mark.parametrize("kind", sorted(RULE_CASES))
def test_rule_checker_accepts_and_rejects(kind):
    args, keeps, breaks = RULE_CASES[kind]
    rule = [{"kind": kind, "args": args}]
    assert if_utils.follows(f"\n  {keeps}  \n", rule) == [True]
    assert if_utils.follows(breaks, rule) == [False]


def test_ifeval_process_results_scores_a_prompt_and_its_rules():
    doc = {"rules": json.dumps([{"kind": "lowercase", "args": {}}, {"kind": "no_commas", "args": {}}])}
    assert if_utils.process_results(doc, ["calm, quiet mornings."]) == {"prompt_strict": 0.0, "inst_strict": 0.5}
    assert if_utils.process_results(doc, ["calm quiet mornings."]) == {"prompt_strict": 1.0, "inst_strict": 1.0}
    assert if_utils.process_results(doc, ["Calm, quiet mornings."]) == {"prompt_strict": 0.0, "inst_strict": 0.0}


def test_ifeval_docs_are_well_formed():
    test_docs = _rows(TASKS / "ifeval_lite" / "test.jsonl")
    train_docs = _rows(TASKS / "ifeval_lite" / "train.jsonl")
    assert len(test_docs) == generator.IF_TEST_SIZE and train_docs
    assert not {d["prompt"] for d in test_docs} & {d["prompt"] for d in train_docs}
    for doc in test_docs + train_docs:
        rules = json.loads(doc["rules"])
        kinds = [r["kind"] for r in rules]
        assert 1 <= len(rules) <= 2 and len(set(kinds)) == len(kinds) and kinds == doc["kinds"]
        assert frozenset(kinds) not in generator.CONFLICTS


def test_both_tasks_load_offline_through_lm_eval(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from opd.pipeline.benchmark import _import_lm_eval

    _import_lm_eval()  # the way `opd eval` imports it (most of this test's time: vLLM's modules)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)  # skips indexing lm-eval's own tasks
    tasks = manager.load(["handbook_qa", "handbook_qa_seen", "handbook_qa_in_context", "ifeval_lite"])["tasks"]
    qa, seen, ifeval = tasks["handbook_qa"], tasks["handbook_qa_seen"], tasks["ifeval_lite"]
    qa_test = list(qa.test_docs())
    assert len(qa_test) == len(_rows(TASKS / "handbook_qa" / "test.jsonl"))
    assert len(list(ifeval.test_docs())) == generator.IF_TEST_SIZE
    doc = qa_test[0]
    assert qa.doc_to_text(doc) == doc["question"]
    seen_doc = list(seen.test_docs())[0]  # the same facts in the SFT data's words
    in_context = tasks["handbook_qa_in_context"]  # the fact in view, as the sdft preset's teacher sees it
    from opd.configs.stage_sections import TEACHER_CONTEXT_TEMPLATE

    want = TEACHER_CONTEXT_TEMPLATE.replace("{prompt}", doc["question"]).replace("{context}", doc["fact"])
    assert in_context.doc_to_text(list(in_context.test_docs())[0]) == want
    assert seen_doc["id"] == doc["id"] and seen.doc_to_text(seen_doc) == doc["train_question"] != doc["question"]
    assert qa.process_results(doc, [f"That would be {doc['answer']}."]) == {"answer_match": 1.0}
    if_doc = next(iter(ifeval.test_docs()))
    assert set(ifeval.process_results(if_doc, [""])) == {"prompt_strict", "inst_strict"}
    assert qa.config.generation_kwargs["max_gen_toks"] == 32 and ifeval.config.generation_kwargs["do_sample"] is False
