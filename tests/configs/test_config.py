"""Run configuration: presets, path resolution, --set overrides, validation errors, round trips."""

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.cache.errors import OpdError
from opd.configs import schema as C
from opd.configs.schema import (
    PACKAGED_CONFIGS,
    ConfigError,
    OpdConfig,
    RolloutConfig,
    ScoreConfig,
    StopRule,
    TrainConfig,
    dumps_config,
    load_config,
    loads_config,
    parse_override,
)

CONFIGS = Path(C.__file__).resolve().parent

MINIMAL = """
[run]
student = "tiny:student"
teacher = "tiny:teacher"

[rollout]
prompts = "prompts.jsonl"
"""


def write_config(folder: Path, text: str, name="cfg.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ loading


def test_load_tiny_preset():
    cfg = load_config("tiny")
    assert isinstance(cfg, OpdConfig)
    assert cfg.run.name == "tiny"
    assert (cfg.run.student, cfg.run.teacher) == ("tiny:student", "tiny:teacher")  # names are not paths
    assert cfg.run.rounds == 2
    assert cfg.rollout.prompts == str((CONFIGS / "tiny_prompts.jsonl").resolve())
    assert Path(cfg.rollout.prompts).is_file()
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.prompts_per_shard) == (2, 24, 8)
    assert (cfg.score.top_k, cfg.score.logprob_bits) == (16, 8)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    # defaults fill the rest
    assert cfg.train.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.score.render == "student_ids"
    # by path too, with the same result
    assert load_config(CONFIGS / "tiny.toml") == cfg
    assert load_config(str(CONFIGS / "tiny.toml")) == cfg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="not found") as e:
        load_config("no-such-preset")
    assert "tiny" in str(e.value)  # lists the presets


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    path = write_config(tmp_path / "cfgs", MINIMAL.replace('"tiny:student"', '"models/student"'))
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    cfg = load_config(path)
    assert cfg.rollout.prompts == str(tmp_path / "cfgs" / "prompts.jsonl")
    assert cfg.run.student == str(tmp_path / "cfgs" / "models" / "student")
    assert cfg.run.teacher == "tiny:teacher"
    assert cfg.run.models_dir == ""  # empty means the default, not the config folder
    # absolute paths stay as they are; URLs/names with a scheme are not paths
    cfg = load_config(
        write_config(
            tmp_path / "cfgs",
            MINIMAL.replace('"prompts.jsonl"', '"/data/p.jsonl"').replace('"tiny:teacher"', '"opd:smollm2-135m"'),
            "abs.toml",
        )
    )
    assert cfg.rollout.prompts == "/data/p.jsonl"
    assert cfg.run.teacher == "opd:smollm2-135m"


def test_loads_config_resolves_against_base_dir(tmp_path):
    cfg = loads_config(MINIMAL, base_dir=tmp_path)
    assert cfg.rollout.prompts == str(tmp_path / "prompts.jsonl")


# ------------------------------------------------------------------------------------------ overrides


def test_set_overrides_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        "tiny",
        [
            "train.lr=3e-4",  # float
            "train.beta=1",  # an int where a float is expected becomes a float
            "score.top_k=32",  # int
            "rollout.chat_template=false",  # bool
            "rollout.stop=['###', \"\\n\\n\"]",  # list
            "rollout.lmbda_schedule=[1, 0.5]",  # list of floats, ints accepted
            "run.name=my run",  # not TOML: kept as a string
            "run.seed = 7",  # spaces around the key
            "rollout.prompts=data/p.jsonl",  # a --set path resolves against the current folder
            "run.teacher=tiny:student",  # a name, not a path
            "run.models_dir=~/models",
        ],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.train.beta == 1.0 and isinstance(cfg.train.beta, float)
    assert cfg.score.top_k == 32
    assert cfg.rollout.chat_template is False
    assert cfg.rollout.stop == ["###", "\n\n"]
    assert cfg.rollout.lmbda_schedule == [1.0, 0.5] and all(isinstance(v, float) for v in cfg.rollout.lmbda_schedule)
    assert cfg.run.name == "my run"
    assert cfg.run.seed == 7
    assert cfg.rollout.prompts == str(tmp_path / "data" / "p.jsonl")
    assert cfg.run.teacher == "tiny:student"
    assert cfg.run.models_dir == str(Path("~/models").expanduser().resolve())
    # untouched values keep the file's
    assert cfg.rollout.n == 2


def test_quoted_string_override():
    assert load_config("tiny", ['run.name="a=b"']).run.name == "a=b"
    assert parse_override("train.lr=1e-5") == ("train", "lr", 1e-5)
    assert parse_override("run.name=x.y=z") == ("run", "name", "x.y=z")
    assert parse_override("eval.stop.patience = 3") == ("eval", "stop.patience", 3)


# ------------------------------------------------------------------------------------------ errors


def _error(overrides, config="tiny"):
    with pytest.raises(ConfigError) as e:
        load_config(config, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert isinstance(e.value, OpdError)
    return msg


@pytest.mark.parametrize(
    "item, expect",
    [
        ("train.lrr=1e-5", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1e-5", "unknown section 'trian' (did you mean 'train'?)"),
        ("score.topk=8", "did you mean 'score.top_k'?"),
        ("rollout.lambda=0.5", "did you mean 'rollout.lmbda'?"),
    ],
)
def test_unknown_names_suggest(item, expect):
    assert expect in _error([item])


def test_unknown_name_without_close_match_lists_valid():
    msg = _error(["zzzzzz.q=1"])
    assert "unknown section 'zzzzzz'" in msg and "valid: eval, rollout, run, score, sft, train" in msg


def test_unknown_key_in_file(tmp_path):
    path = write_config(tmp_path, MINIMAL + "\n[score]\ntopk = 8\n")
    msg = _error([], path)
    assert str(path) in msg and "score.topk" in msg and "did you mean 'score.top_k'" in msg
    path = write_config(tmp_path, MINIMAL + "\n[scores]\ntop_k = 8\n")
    assert "did you mean 'score'" in _error([], path)


@pytest.mark.parametrize(
    "item, key, shown, allowed",
    [
        ("score.top_k=1.5", "score.top_k", "1.5", "must be an integer"),
        ("score.top_k=true", "score.top_k", "True", "must be an integer"),
        ("score.top_k=many", "score.top_k", "'many'", "must be an integer"),
        ("train.lr=fast", "train.lr", "'fast'", "must be a number"),
        ("train.lr=false", "train.lr", "False", "must be a number"),
        ("rollout.chat_template=1", "rollout.chat_template", "1", "must be true or false"),
        ("rollout.chat_template=yes", "rollout.chat_template", "'yes'", "must be true or false"),
        ("rollout.stop=stop", "rollout.stop", "'stop'", "must be a list of str"),
        ("rollout.stop=[1]", "rollout.stop", "1", "must be a string"),
        ("run.name=[1, 2]", "run.name", "[1, 2]", "must be a string"),
    ],
)
def test_wrong_type(item, key, shown, allowed):
    msg = _error([item])
    assert f"{key} = {shown} is invalid" in msg and allowed in msg


@pytest.mark.parametrize(
    "item, key, shown, allowed",
    [
        ("score.top_k=0", "score.top_k", "0", "must be >= 1"),
        ("rollout.lmbda=1.5", "rollout.lmbda", "1.5", "must be in [0, 1]"),
        ("rollout.top_p=0", "rollout.top_p", "0.0", "must be in (0, 1]"),
        ("rollout.top_k=0", "rollout.top_k", "0", "must be -1 (off) or >= 1"),
        ("rollout.lmbda_schedule=[1, 2]", "rollout.lmbda_schedule", "[1.0, 2.0]", "every value must be in [0, 1]"),
        ("run.rounds=0", "run.rounds", "0", "must be >= 1"),
        ("train.lora_dropout=1.0", "train.lora_dropout", "1.0", "must be in [0, 1)"),
        ("score.zstd_level=23", "score.zstd_level", "23", "must be in [1, 22]"),
        ("train.lora_target_modules=[]", "train.lora_target_modules", "[]", "must name at least one module"),
        ("train.temperature=-1", "train.temperature", "-1.0", "must be > 0"),
    ],
)
def test_out_of_range(item, key, shown, allowed):
    msg = _error([item])
    assert f"{key} = {shown} is invalid" in msg and allowed in msg


@pytest.mark.parametrize(
    "item, key, shown",
    [
        ("train.loss=kl", "train.loss", "'kl'"),
        ("score.logprob_bits=4", "score.logprob_bits", "4"),
        ("rollout.engine=sglang", "rollout.engine", "'sglang'"),
        ("score.dtype=float64", "score.dtype", "'float64'"),
        ("score.render=other", "score.render", "'other'"),
        ("score.device=tpu", "score.device", "'tpu'"),
        ("rollout.offpolicy_source=web", "rollout.offpolicy_source", "'web'"),
    ],
)
def test_bad_choice(item, key, shown):
    msg = _error([item])
    assert f"{key} = {shown} is invalid" in msg
    assert "must be" in msg


def test_choice_lists_the_allowed_values():
    assert "must be one of 'jsd', 'sampled_rkl'" in _error(["train.loss=kl"])
    assert "must be one of 8, 16, 32" in _error(["score.logprob_bits=4"])


def test_missing_required(tmp_path):
    path = write_config(tmp_path, MINIMAL.replace('teacher = "tiny:teacher"\n', ""))
    msg = _error([], path)
    assert "missing required key run.teacher" in msg and str(path) in msg
    path = write_config(tmp_path, MINIMAL.replace('prompts = "prompts.jsonl"\n', "n = 2\n"))
    assert "missing required key rollout.prompts" in _error([], path)
    path = write_config(tmp_path, MINIMAL.split("[rollout]")[0])
    assert "missing section [rollout]" in _error([], path)
    # a required value given as empty
    path = write_config(tmp_path, MINIMAL)
    assert "run.student = '' is invalid" in _error(["run.student="], path)


def test_section_must_be_a_table(tmp_path):
    path = write_config(tmp_path, "score = 3\n" + MINIMAL)
    assert "[score] must be a table" in _error([], path)


@pytest.mark.parametrize("item", ["train.lr", "trainlr=1", "=1", "lr=1e-5", ""])
def test_malformed_set(item):
    msg = _error([item])
    assert "expected section.key=value" in msg and repr(item) in msg


def test_invalid_toml_file(tmp_path):
    path = write_config(tmp_path, "[run\nstudent = ")
    msg = _error([], path)
    assert "not valid TOML" in msg and str(path) in msg


# ------------------------------------------------------------------------------------------ round trip


def test_dumps_loads_roundtrip_tiny():
    cfg = load_config("tiny")
    text = dumps_config(cfg)
    assert loads_config(text) == cfg
    assert tomllib.loads(text)["score"]["top_k"] == 16
    # every field is written out
    for section, cls in (
        ("run", C.RunConfig),
        ("rollout", RolloutConfig),
        ("score", ScoreConfig),
        ("train", TrainConfig),
    ):
        assert set(tomllib.loads(text)[section]) == {f.name for f in dataclasses.fields(cls)}
    # the file holds exactly the config's values, records as tables
    assert tomllib.loads(text) == cfg.to_dict()
    assert "\n[eval.stop]\n" in text and text.startswith("# Resolved opd config")


# any text but lone surrogates and DEL (see test_dumps_escapes_del), control characters included
printable = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x7f"), max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    name=printable,
    stop=st.lists(printable, max_size=3),
    lr=st.floats(1e-12, 1e3),
    beta=st.floats(0, 1),
    seed=st.integers(-(2**63), 2**63 - 1),
    top_k=st.integers(1, 10**6),
    schedule=st.lists(st.floats(0, 1), max_size=4),
    chat=st.booleans(),
    rule=st.builds(
        StopRule,
        metric=st.sampled_from(("", *C.STOP_METRICS)),
        min_delta=st.floats(0, 1e3),
        patience=st.integers(1, 2**63 - 1),
    ),
)
def test_dumps_loads_roundtrip_any_values(name, stop, lr, beta, seed, top_k, schedule, chat, rule):
    cfg = load_config("tiny")
    cfg = cfg.replace("run", name=name, seed=seed).replace("train", lr=lr, beta=beta)
    cfg = cfg.replace("score", top_k=top_k).replace("rollout", stop=stop, lmbda_schedule=schedule, chat_template=chat)
    cfg = cfg.replace("eval", stop=rule)
    assert loads_config(dumps_config(cfg)) == cfg


def test_dumps_escapes_control_characters():
    cfg = load_config("tiny").replace("run", name='tab\there "quoted" \\ back\nnew line \x1b')
    assert loads_config(dumps_config(cfg)) == cfg


def test_dumps_escapes_del():
    cfg = load_config("tiny").replace("run", name="a\x7fb")
    assert loads_config(dumps_config(cfg)) == cfg


# ------------------------------------------------------------------------------------------ behaviour


def test_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.score.top_k = 1
    # replace makes a new config and leaves the old one alone
    new = cfg.replace("train", lr=0.5)
    assert new.train.lr == 0.5 and cfg.train.lr == 1e-3
    # replace validates
    with pytest.raises(ConfigError, match="train.lr"):
        cfg.replace("train", lr=-1.0)


def test_section_hash():
    cfg = load_config("tiny")
    h = cfg.section_hash("score")
    assert len(h) == 64 and int(h, 16) >= 0
    # the same in another process with another str hash seed (a fingerprint must not depend on either)
    code = "from opd.configs.schema import load_config; print(load_config('tiny').section_hash('score'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == h
    assert cfg.replace("score", top_k=17).section_hash("score") != h
    assert cfg.replace("score", temperature=0.5).section_hash("score") != h
    # its HOW keys (settings that change no byte of the output) do not move it
    assert cfg.replace("score", max_tokens_per_batch=cfg.score.max_tokens_per_batch + 1).section_hash("score") == h
    # other sections do not move it
    assert cfg.replace("train", lr=0.5).section_hash("score") == h
    assert cfg.replace("train", lr=0.5).section_hash("train") != cfg.section_hash("train")
    assert len({cfg.section_hash(s) for s in ("run", "rollout", "score", "train")}) == 4


def test_lmbda_for_round():
    r = load_config("tiny").rollout
    assert r.lmbda_schedule == [] and [r.lmbda_for_round(i) for i in range(3)] == [1.0, 1.0, 1.0]
    r = load_config("tiny", ["rollout.lmbda=0.25"]).rollout
    assert r.lmbda_for_round(0) == 0.25 and r.lmbda_for_round(9) == 0.25
    r = load_config("tiny", ["rollout.lmbda_schedule=[1.0, 0.5, 0.0]", "rollout.lmbda=0.25"]).rollout
    assert [r.lmbda_for_round(i) for i in range(6)] == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    r = load_config("tiny", ["rollout.lmbda_schedule=[0.3]"]).rollout
    assert r.lmbda_for_round(0) == r.lmbda_for_round(100) == 0.3


def test_dataclass_defaults_survive_the_loader(tmp_path):
    # a file naming only the required keys gets every other value from the dataclass defaults
    cfg = loads_config(MINIMAL, base_dir=tmp_path)
    built = OpdConfig(
        run=C.RunConfig(student="tiny:student", teacher="tiny:teacher"),
        rollout=RolloutConfig(prompts=str(tmp_path / "prompts.jsonl")),
    )
    assert cfg == built
    # each default has its annotated type (an int default for a float key would hash as "1", not "1.0")
    for section, cls in C._SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value, tp = getattr(getattr(built, section), f.name), hints[f.name]
            origin = typing.get_origin(tp) or tp
            assert isinstance(value, origin) and (origin is not int or not isinstance(value, bool)), (section, f.name)
    # written out and read back, the defaults keep their values and their fingerprints
    again = loads_config(dumps_config(built))
    assert again == built
    for section in C._SECTION_TYPES:
        assert again.section_hash(section) == built.section_hash(section), section


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.toml")))
def test_every_packaged_preset_loads(name):
    cfg = load_config(name)
    assert cfg.run.name == name or name == "smollm2"
    assert loads_config(dumps_config(cfg)) == cfg
    if cfg.rollout.prompts.startswith(str(PACKAGED_CONFIGS)):  # shipped prompt sets exist and are disjoint
        lines = Path(cfg.rollout.prompts).read_text().splitlines()
        train = {json.loads(x)[cfg.rollout.prompt_field] for x in lines if x.strip()}
        assert len(train) >= 16
        if cfg.eval.enabled:
            lines = Path(cfg.eval.prompts).read_text().splitlines()
            held = {json.loads(x)[cfg.eval.prompt_field] for x in lines if x.strip()}
            assert held and not held & train
    if cfg.eval.tasks and cfg.rollout.prompts.startswith(str(PACKAGED_CONFIGS / "tasks")):  # a task's train split
        test = Path(cfg.rollout.prompts).with_name("test.jsonl").read_text().splitlines()
        assert "train.jsonl" in cfg.rollout.prompts and not {json.loads(x)["question"] for x in test} & train


def test_tensor_parallel_recipe_splits_the_score_pool_into_teacher_groups():
    """configs/qwen3-1.7b-from-32b.toml: vLLM scorer at TP 2, two score workers on GPUs "2,3" and "4,5",
    pools disjoint from rollout and the learner, so scoring follows rollout."""
    from opd.pipeline.loop import Pool, _overlap_pays

    cfg = load_config("qwen3-1.7b-from-32b")
    assert cfg.score.engine == "vllm" and cfg.score.tensor_parallel_size == 2 and cfg.score.temperature == 1.0
    score = Pool.parse(cfg.run.score_devices, "score").grouped(
        cfg.score.tensor_parallel_size * cfg.score.pipeline_parallel_size, "score"
    )
    assert score.devices == ("2,3", "4,5")
    rollout, train = Pool.parse(cfg.run.rollout_devices, "r"), Pool.parse(cfg.run.train_devices, "t")
    assert score.disjoint(rollout) and score.disjoint(train) and _overlap_pays(rollout, score)
    assert cfg.score.max_model_len > cfg.rollout.max_new_tokens


def test_importing_the_schema_does_not_import_torch():
    code = "import sys, opd.configs.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_loader_does_not_know_the_schema_and_no_config_file_is_over_450_lines():
    code = "import sys, opd.configs.loading; print('opd.configs.schema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # the schema is passed in as root=
    for path in sorted(CONFIGS.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 450, path


# ------------------------------------------------------------------------------------------ a record: [eval.stop]


def test_stop_rule_defaults_to_off():
    stop = load_config("tiny").eval.stop
    assert stop == StopRule() and (stop.metric, stop.min_delta, stop.patience) == ("", 0.0, 1)


@pytest.mark.parametrize(
    "table",
    [
        '[eval.stop]\nmetric = "heldout_rkl"\nmin_delta = 1\npatience = 3\n',  # a table of tables
        '[eval]\nstop = { metric = "heldout_rkl", min_delta = 1, patience = 3 }\n',  # an inline table
    ],
)
def test_stop_rule_from_a_file(tmp_path, table):
    cfg = load_config(write_config(tmp_path, MINIMAL + table))
    assert cfg.eval.stop == StopRule(metric="heldout_rkl", min_delta=1.0, patience=3)
    assert isinstance(cfg.eval.stop.min_delta, float)  # an int where a float is expected becomes a float


def test_stop_rule_from_set():
    cfg = load_config("tiny", ["eval.stop.metric=accuracy", "eval.stop.patience = 3", "eval.stop.min_delta=0.01"])
    assert cfg.eval.stop == StopRule(metric="accuracy", min_delta=0.01, patience=3)
    # a whole record as an inline table replaces the record: keys it does not name take their defaults
    cfg = load_config("tiny", ["eval.stop.patience=3", 'eval.stop={metric="heldout_teacher_nll", min_delta=0.5}'])
    assert cfg.eval.stop == StopRule(metric="heldout_teacher_nll", min_delta=0.5, patience=1)
    # --set on top of a file's [eval.stop] changes only the key it names
    cfg = load_config("tiny", ['eval.stop={metric="heldout_rkl", patience=4}', "eval.stop.min_delta=2"])
    assert cfg.eval.stop == StopRule(metric="heldout_rkl", min_delta=2.0, patience=4)


@pytest.mark.parametrize(
    "items, expect",
    [
        (["eval.stop.patience=0"], "eval.stop.patience = 0 is invalid: must be >= 1"),
        (["eval.stop.patience=-1"], "eval.stop.patience = -1 is invalid: must be >= 1"),
        (["eval.stop.patience=1.5"], "eval.stop.patience = 1.5 is invalid: must be an integer"),
        (["eval.stop.patience=true"], "eval.stop.patience = True is invalid: must be an integer"),
        (["eval.stop.min_delta=-0.1"], "eval.stop.min_delta = -0.1 is invalid: must be >= 0"),
        (["eval.stop.min_delta=small"], "eval.stop.min_delta = 'small' is invalid: must be a number"),
        (["eval.stop.metric=loss"], "eval.stop.metric = 'loss' is invalid: must be one of '', 'heldout_rkl', "),
        (["eval.stop.patiense=2"], "unknown key 'eval.stop.patiense' (did you mean 'eval.stop.patience'?)"),
        (["eval.stop={patiense=2}"], "unknown key 'eval.stop.patiense' (did you mean 'eval.stop.patience'?)"),
        (["eval.stop={patience=0}"], "eval.stop.patience = 0 is invalid: must be >= 1"),
        (["eval.stop=3"], "eval.stop = 3 is invalid: must be a table"),
        (["eval.stop.patience.x=1"], "cannot set eval.stop.patience.x: eval.stop.patience is not a table"),
        (["eval.stop[0]=1"], "cannot set eval.stop[0]: eval.stop is not a list"),
        (["eval=3"], "expected section.key=value"),
        (
            ["eval.checker=", "eval.stop.metric=accuracy"],
            "eval.stop.metric = 'accuracy' is invalid: 'accuracy' needs eval.checker",
        ),
    ],
)
def test_stop_rule_errors_name_the_full_path(items, expect):
    assert expect in _error(items)


def test_stop_rule_error_in_a_file(tmp_path):
    path = write_config(tmp_path, MINIMAL + "[eval.stop]\npatience = 0\n")
    msg = _error([], path)
    assert str(path) in msg and "eval.stop.patience = 0 is invalid: must be >= 1" in msg
    path = write_config(tmp_path, MINIMAL + "[eval.stop]\nmetrc = 'heldout_rkl'\n")
    assert "unknown key 'eval.stop.metrc' (did you mean 'eval.stop.metric'?)" in _error([], path)


def test_replace_reaches_into_a_record():
    cfg = load_config("tiny")
    new = cfg.replace("eval.stop", metric="heldout_rkl", patience=2)
    assert new.eval.stop == StopRule(metric="heldout_rkl", patience=2) and cfg.eval.stop == StopRule()
    assert new.eval.n == cfg.eval.n
    # the section checks the record it is given, by its full path
    with pytest.raises(ConfigError, match=r"eval\.stop\.patience = 0 is invalid"):
        cfg.replace("eval.stop", patience=0)
    with pytest.raises(ConfigError, match=r"eval\.stop = \{'patience': 2\} is invalid: must be a StopRule record"):
        cfg.replace("eval", stop={"patience": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eval.stop.patience = 5


# ------------------------------------------------------------------------------------------ arrays of tables
# A schema made for these tests runs through the same loader and writer: a top-level array of tables
# ([[teachers]]), and a section holding a record and a list of records ([mix.stop], [[mix.rules]]).


@dataclass(frozen=True, kw_only=True)
class Teacher:
    name: str  # label
    model: str  # checkpoint
    weight: float = 1.0  # share of the loss
    layers: list[int] = field(default_factory=list)  # layers matched

    def check(self, at: str) -> None:
        if not self.model:
            raise ConfigError(f"{at}.model = {self.model!r} is invalid: a model is required")
        if self.weight <= 0:
            raise ConfigError(f"{at}.weight = {self.weight!r} is invalid: must be > 0")


@dataclass(frozen=True, kw_only=True)
class MixSection:
    temperature: float = 1.0  # τ
    stop: StopRule = field(default_factory=StopRule)  # a record in a section
    rules: list[StopRule] = field(default_factory=list)  # a list of records in a section

    def __post_init__(self):
        C.check_records(self, "mix")


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    teachers: list[Teacher]  # a top-level array of tables
    mix: MixSection = field(default_factory=MixSection)  # a section

    def __post_init__(self):
        C.check_records(self, "")


MIX = """
[[teachers]]
name = "a"
model = "x"

[[teachers]]
name = "b"
model = "y"
weight = 2
layers = [1, 2]

[mix]
temperature = 0.5

[mix.stop]
metric = "heldout_rkl"

[[mix.rules]]
patience = 2

[[mix.rules]]
metric = "accuracy"
"""


def _mix(tmp_path, text=MIX, overrides=()):
    return load_config(write_config(tmp_path, text, "mix.toml"), overrides, root=MixConfig)


def _mix_error(tmp_path, text=MIX, overrides=()):
    with pytest.raises(ConfigError) as e:
        _mix(tmp_path, text, overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_arrays_of_tables_load(tmp_path):
    cfg = _mix(tmp_path)
    assert cfg.teachers == [
        Teacher(name="a", model="x"),
        Teacher(name="b", model="y", weight=2.0, layers=[1, 2]),
    ]
    assert isinstance(cfg.teachers[1].weight, float)
    assert cfg.mix == MixSection(
        temperature=0.5,
        stop=StopRule(metric="heldout_rkl"),
        rules=[StopRule(patience=2), StopRule(metric="accuracy")],
    )
    # the same written inline
    inline = 'teachers = [{name = "a", model = "x"}]\n[mix]\nrules = [{patience = 2}]\n'
    cfg = _mix(tmp_path, inline)
    assert cfg.teachers == [Teacher(name="a", model="x")] and cfg.mix.rules == [StopRule(patience=2)]


def test_arrays_of_tables_round_trip(tmp_path):
    cfg = _mix(tmp_path)
    text = dumps_config(cfg)
    assert "\n[[teachers]]\n" in text and "\n[mix.stop]\n" in text
    assert tomllib.loads(text) == dataclasses.asdict(cfg)
    assert loads_config(text, root=MixConfig) == cfg
    empty = MixConfig(teachers=[])
    assert loads_config(dumps_config(empty), root=MixConfig) == empty


@settings(max_examples=40, deadline=None)
@given(
    teachers=st.lists(
        st.builds(
            Teacher,
            name=printable,
            model=printable.filter(bool),
            weight=st.floats(1e-6, 1e6),
            layers=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        ),
        max_size=4,
    ),
    rules=st.lists(st.builds(StopRule, patience=st.integers(1, 100), min_delta=st.floats(0, 1)), max_size=3),
)
def test_arrays_of_tables_round_trip_any_values(teachers, rules):
    cfg = MixConfig(teachers=teachers, mix=MixSection(rules=rules))
    assert loads_config(dumps_config(cfg), root=MixConfig) == cfg


def test_arrays_of_tables_from_set(tmp_path):
    # a whole array as an inline value
    cfg = _mix(tmp_path, overrides=['teachers=[{name="c", model="z", weight=3}]'])
    assert cfg.teachers == [Teacher(name="c", model="z", weight=3.0)]
    # one key of the N-th table, by index
    cfg = _mix(tmp_path, overrides=["teachers[1].model=w", "teachers[0].layers=[4]", "mix.rules[1].patience=5"])
    assert [t.model for t in cfg.teachers] == ["x", "w"] and cfg.teachers[0].layers == [4]
    assert cfg.mix.rules[1] == StopRule(metric="accuracy", patience=5)
    # a whole table of an array, and a record of a section
    cfg = _mix(tmp_path, overrides=['teachers[0]={name="d", model="v"}', "mix.stop.patience=7"])
    assert cfg.teachers[0] == Teacher(name="d", model="v") and cfg.mix.stop.patience == 7


@pytest.mark.parametrize(
    "text, overrides, expect",
    [
        (MIX.replace('model = "y"', 'model = ""'), [], "teachers[1].model = '' is invalid: a model is required"),
        (MIX.replace('model = "y"\n', ""), [], "missing required key teachers[1].model"),
        (MIX.replace("weight = 2", 'weight = "2"'), [], "teachers[1].weight = '2' is invalid: must be a number"),
        (MIX.replace("weight = 2", "weight = 0"), [], "teachers[1].weight = 0.0 is invalid: must be > 0"),
        (MIX.replace("layers = [1, 2]", "layers = [1, 2.5]"), [], "teachers[1].layers = 2.5 is invalid: must be an"),
        (MIX.replace('model = "x"', 'modle = "x"'), [], "unknown key 'teachers[0].modle' (did you mean"),
        (MIX.replace("patience = 2", "patience = 0"), [], "mix.rules[0].patience = 0 is invalid: must be >= 1"),
        ("teachers = 3\n", [], "teachers = 3 is invalid: must be a list of tables"),
        ("teachers = [1]\n", [], "teachers[0] = 1 is invalid: must be a table"),
        ("[mix]\n", [], "missing required key teachers"),
        (MIX, ["teachers[1].model="], "teachers[1].model = '' is invalid: a model is required"),
        (MIX, ["teachers[2].model=z"], "cannot set teachers[2]: teachers has 2 entries"),
        (MIX, ["teachers[0].modle=z"], "unknown key 'teachers[0].modle' (did you mean 'teachers[0].model'?)"),
        (MIX, ["teacher=[]"], "expected section.key=value"),
        (MIX, ["mix=3"], "expected section.key=value"),
        (MIX, ["mix.temperature[0]=1"], "cannot set mix.temperature[0]: mix.temperature is not a list"),
        (MIX, ['mix.rules=[{metric="x"}]'], "mix.rules[0].metric = 'x' is invalid: must be one of"),
        (MIX, ["mix.rules=[3]"], "mix.rules[0] = 3 is invalid: must be a table"),
    ],
)
def test_arrays_of_tables_errors_name_the_full_path(tmp_path, text, overrides, expect):
    assert expect in _mix_error(tmp_path, text, overrides)


def test_records_are_checked_when_built_in_code():
    with pytest.raises(ConfigError, match=r"^teachers\[1\]\.weight = -1 is invalid"):
        MixConfig(teachers=[Teacher(name="a", model="x"), Teacher(name="b", model="y", weight=-1)])
    with pytest.raises(ConfigError, match=r"^mix\.rules\[0\]\.patience = 0 is invalid"):
        MixSection(rules=[StopRule(patience=0)])
    with pytest.raises(ConfigError, match=r"must be a list of StopRule records"):
        MixSection(rules=StopRule())
