"""The toy world: an MMLU-Pro-style question set, a trained tokenizer, and a tiny Mixtral and Mistral
pretrained on it on CPU, so every notebook tells its story without a GPU or a network.

Usage: `world = build_world("runs/toy/world", seed=0)` or `python -m helpers toy build [--quick]`

Layout under the world directory (manifest output names in quotes):
  mmlu_pro/data/{test,validation,train}-00000-of-00001.parquet   "mmlu_pro" (hub layout)
  tokenizer/                                                     "tokenizer"
  mixtral/, mistral/   HF checkpoints, several shards, legacy expert keys, tokenizer inside  "mixtral", "mistral"
  finetune/{train,eval}.jsonl   chat rows from a subset of categories (domain shift)        "finetune"
  calib/calib.jsonl             {"text"} rows across all categories                       "calib"
  manifest.json                 spec hash + seed (the cache key), per-category accuracy under each
                                scoring (cloze, cloze_norm, loglik, cot), expert spread

Models learn answers as plain "Question: ...\nAnswer: <option text>" sequences (plus some in the
chat format) and, for a share of the sequences, as official MMLU-Pro CoT documents (header, 0-2 worked
shots, the question, "Answer: Let's think step by step.", a one-sentence reasoning ending in the answer
text, "The answer is (X).", the next "Question:"). Tiny models do not learn to bind letters, so the
headline score is cloze: the option whose " <text>" is most likely after "Question: {question}\nAnswer:".
CoT replies parse (the format is learned), but the letter stays near chance and so does the answer text
the reasoning ends in (`cot_text`, a toy diagnostic, not the official metric): computing the answer 100+
tokens after the question, past the options, is not learned in the build's budget (the manifest records
both beside the targets, `cot_targets`).
The Mixtral is upcycled from a dense twin (experts start as noisy copies of one trained MLP) and
trained on with a load-balancing loss, so experts differ by what they were routed. The cache key
is the spec hash plus the seed: bump SPEC_VERSION when a generator or the training changes.
What the manifest records about the models (accuracies, chance, targets, experts) comes from
helpers/toy/measure.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from pathlib import Path

import torch

from helpers.core.compat import make_portable
from helpers.core.data import load_texts
from helpers.core.fsutil import atomic_dir, read_json, write_jsonl
from helpers.core.manifest import FILENAME, Manifest
from helpers.eval import mmlu_pro
from helpers.toy import tasks
from helpers.toy.measure import SCORINGS, chance, cot_targets, expert_stats, headroom, summary, world_accuracy
from helpers.toy.train import (
    BASE_CONFIG,
    dense_twin,
    encode_cot,
    encode_pairs,
    model_config,
    pretrain,
    save_model,
    upcycle,
)

SPEC_VERSION = 2  # bump when generators or training change what a seed builds
FULL = {
    "version": SPEC_VERSION,
    "data": {
        "test": 100,
        "validation": 5,
        "train": 1500,
        "finetune": 600,
        "finetune_eval": 40,
        "calib": 48,
        "n_countries": 100,
        "finetune_categories": ["comparison", "counting"],  # categories with headroom for the fine-tune
    },
    "tokenizer": {"vocab_size": 768},
    # a fifth of the training rows in the chat format (notebook 01 fine-tunes through the chat template);
    # question tokens weigh a quarter of answer tokens in the loss
    "pretrain": {"chat_fraction": 0.2, "question_weight": 0.25},
    "mistral": {
        "config": {"num_hidden_layers": 16, "hidden_size": 64, "intermediate_size": 192},
        "train": {"steps": 800, "batch": 32, "lr": 3e-3},
        # a share of the sequences are official CoT documents with 0, 1, ... worked shots (weights `shots`):
        # enough for the format; the 16-layer model pays most for long documents, so it sees fewer and shorter
        "cot": {"fraction": 0.06, "shots": [1, 1]},
        "n_shards": 4,
    },
    "mixtral": {
        "config": {
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02,
        },
        "dense_train": {"steps": 600, "batch": 32, "lr": 3e-3},
        "upcycle_noise": 0.05,
        "train": {"steps": 800, "batch": 32, "lr": 2e-3},
        "cot": {"fraction": 0.15, "shots": [2, 2, 1]},
        "n_shards": 4,
    },
    "eval_batch": 64,
    # CoT: the official rule (5 shots, dropped while the prompt is >= max_model_length - max_new_tokens) at the
    # models' 512-token context (1-3 shots fit); a toy reply, answer line and stop included, is about 25 tokens
    "eval_cot": {"per_category": 25, "shots": 5, "max_model_length": 512, "max_new_tokens": 128, "batch": 16},
}
QUICK = {
    "data": {"test": 8, "train": 48, "finetune": 16, "finetune_eval": 4, "calib": 8, "n_countries": 10},
    "tokenizer": {"vocab_size": 400},
    "mistral": {"config": {"hidden_size": 32, "intermediate_size": 48}, "train": {"steps": 6, "batch": 8}},
    "mixtral": {
        "config": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 24},
        "dense_train": {"steps": 4, "batch": 8},
        "train": {"steps": 6, "batch": 8},
    },
    "eval_cot": {"per_category": 1, "max_new_tokens": 8},
}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)
HEADER = (
    "The following are multiple choice questions (with answers) about {}. Think step by step and then "
    'finish your answer with "the answer is (X)" where X is the correct letter choice.'
)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def spec_for(quick: bool) -> dict:
    return _merge(FULL, QUICK) if quick else copy.deepcopy(FULL)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- tokenizer ----


def train_tokenizer(texts: list[str], vocab_size: int, out=None):
    """Byte-level BPE (digits split one by one, as Mistral does), BOS added, Mistral-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=BASE_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    if out is not None:
        fast.save_pretrained(out)
        make_portable(out)
    return fast


# ---- the build ----


def _sft_row(r: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": tasks.answer_text(r)}]
    }


def cached(out, spec: dict, seed: int) -> bool:
    """True when `out` holds a complete world built from this spec and seed."""
    p = Path(out) / FILENAME
    if not p.exists():
        return False
    m = read_json(p)
    ok = m.get("step") == "toy" and m["params"].get("spec_hash") == spec_hash(spec) and m["params"].get("seed") == seed
    return ok and all((Path(out) / name).exists() for name in m.get("outputs", {}))


def write_data(root: Path, spec: dict, seed: int) -> dict[str, list[dict]]:
    """Parquet splits, finetune and calib jsonl under `root`; returns the rows by split."""
    d = spec["data"]
    splits = tasks.make_splits(
        seed,
        {"test": d["test"], "validation": d["validation"], "train": d["train"]},
        n_countries=d["n_countries"],
        extra={"finetune": d["finetune"], "calib": d["calib"]},
        held_extra={"finetune_eval": d["finetune_eval"]},
    )
    for s in ("test", "validation", "train"):
        tasks.write_parquet(splits[s], root / "mmlu_pro" / "data" / f"{s}-00000-of-00001.parquet")
    ft = set(d["finetune_categories"])

    def mixed(name: str, keep=lambda r: True) -> list[dict]:  # categories interleaved: any prefix covers them all
        rows = [r for r in splits[name] if keep(r)]
        random.Random(f"toy-{name}-{seed}").shuffle(rows)
        return rows

    write_jsonl(
        root / "finetune" / "train.jsonl", [_sft_row(r) for r in mixed("finetune", lambda r: r["category"] in ft)]
    )
    write_jsonl(
        root / "finetune" / "eval.jsonl", [_sft_row(r) for r in mixed("finetune_eval", lambda r: r["category"] in ft)]
    )
    write_jsonl(
        root / "calib" / "calib.jsonl",
        [{"text": tasks.qa_text(r["question"], tasks.answer_text(r))} for r in mixed("calib")],
    )
    return splits


def tokenizer_corpus(splits: dict[str, list[dict]]) -> list[str]:
    """Everything the models and notebooks will show the tokenizer: QA, chat and CoT prompt text."""
    texts = [tasks.qa_text(r["question"], tasks.answer_text(r)) for r in splits["train"]]
    texts += [tasks.chat_prompt(r["question"]) + " " + tasks.answer_text(r) + "</s>" for r in splits["train"][::5]]
    texts += [
        r["cot_content"] + " Options: " + " ".join(f"{tasks.LETTERS[i]}. {o}" for i, o in enumerate(r["options"]))
        for r in splits["validation"]
    ]
    texts += [HEADER.format(c) for c in tasks.CATEGORIES] * 20
    return texts


def training_sequences(tok, rows: list[dict], spec: dict, kind: str, seed: int) -> list[tuple[list[int], object]]:
    """Every train row in the QA or chat form, plus official CoT documents: `cot.fraction` of all sequences."""
    seqs: list = encode_pairs(tok, rows, spec["pretrain"]["chat_fraction"], seed)
    cot = spec[kind]["cot"]
    n_docs = round(cot["fraction"] * len(rows) / (1 - cot["fraction"]))
    return seqs + encode_cot(tok, rows, n_docs, cot["shots"], seed)


def build_model(kind: str, spec: dict, tok, train_seqs, seed: int, out: Path) -> tuple[object, dict]:
    """Pretrain one model and save it under out/kind; Mixtral is upcycled from a dense twin first."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(kind, spec, len(tok))
    sp, qw = spec[kind], spec["pretrain"]["question_weight"]
    torch.manual_seed(seed + (1 if kind == "mixtral" else 2))
    t = time.perf_counter()
    info: dict = {}
    if kind == "mixtral":
        dense = AutoModelForCausalLM.from_config(dense_twin(cfg), dtype=torch.float32)
        losses = pretrain(
            dense,
            train_seqs,
            seed=seed,
            pad_id=tok.pad_token_id,
            desc="pretrain mixtral (dense)",
            question_weight=qw,
            **sp["dense_train"],
        )
        info["dense_loss_last"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
        model = upcycle(dense, cfg, sp["upcycle_noise"], seed)
        del dense
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    losses = pretrain(
        model,
        train_seqs,
        seed=seed + 1,
        pad_id=tok.pad_token_id,
        desc=f"pretrain {kind}",
        question_weight=qw,
        **sp["train"],
    )
    info.update(
        params=sum(p.numel() for p in model.parameters()),
        train_s=round(time.perf_counter() - t, 1),
        loss_first=round(sum(losses[:10]) / len(losses[:10]), 4),
        loss_last=round(sum(losses[-20:]) / len(losses[-20:]), 4),
    )
    save_model(model, tok, out / kind, sp["n_shards"])
    return model, info


def _model_job(kind: str, spec: dict, seed: int, root: str, seqs: list, threads: int) -> dict:
    """Train, save and score one model of the world under `root` (in a worker process of build_world):
    returns what the manifest records about it."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    root_p = Path(root)
    tok = AutoTokenizer.from_pretrained(root_p / "tokenizer")
    t = time.perf_counter()
    model, info = build_model(kind, spec, tok, seqs, seed, root_p)
    timings = {f"train_{kind}": round(time.perf_counter() - t, 3)}
    t = time.perf_counter()
    questions, shots = mmlu_pro.load(root_p / "mmlu_pro")  # what every notebook scores, read back from disk
    out = {"info": info, "accuracy": world_accuracy(model, tok, questions, shots, spec)}
    timings[f"eval_{kind}"] = round(time.perf_counter() - t, 3)
    if kind == "mixtral":
        t = time.perf_counter()
        out["experts"] = expert_stats(root_p / kind, model, tok, load_texts("toy", world=root_p))
        timings["expert_stats"] = round(time.perf_counter() - t, 3)
    return out | {"timings": timings}


def _train_models(jobs: dict[str, tuple], workers: int) -> dict[str, dict]:
    """Run _model_job per model: inline, or one spawned process per model (the models share nothing,
    and each trains single-threaded, so two cores build both in the time of the slower one)."""
    if workers <= 1:
        return {kind: _model_job(*args) for kind, args in jobs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {kind: ex.submit(_model_job, *args) for kind, args in jobs.items()}
        return {kind: f.result() for kind, f in futures.items()}


def build_world(
    out="runs/toy/world",
    *,
    quick: bool = False,
    seed: int = 0,
    force: bool = False,
    threads: int = 1,
    workers: int | None = None,
) -> Path:
    """Build (or reuse, when spec and seed match the manifest) the toy world under `out`; returns `out`.

    One thread per model, measured on a shared 2-core box: these matrices are small, and when anything
    else runs two OpenMP threads wait on each other (training steps 10-70x slower; a full build took
    11.5 min with two threads, 4 min with one). A fixed thread count also keeps the trained weights the
    same from run to run. The two models train in `workers` processes (default: 2 for the full build,
    1 for --quick, where starting processes costs more than it saves); the bytes do not depend on it.
    """
    torch.set_num_threads(threads)
    out = Path(out)
    spec = spec_for(quick)
    if not force and cached(out, spec, seed):
        print(f"toy world at {out} is up to date (spec {spec_hash(spec)}, seed {seed}); --force rebuilds")
        return out
    workers = (1 if quick else 2) if workers is None else workers
    m = Manifest("toy", {"seed": seed, "quick": quick, "spec_hash": spec_hash(spec), "spec": spec})
    with atomic_dir(out, overwrite=True) as tmp:
        with m.timer("data"):
            splits = write_data(tmp, spec, seed)
        with m.timer("tokenizer"):
            tok = train_tokenizer(tokenizer_corpus(splits), spec["tokenizer"]["vocab_size"], tmp / "tokenizer")
            seqs = {kind: training_sequences(tok, splits["train"], spec, kind, seed) for kind in ("mistral", "mixtral")}
        with m.timer("models"):
            jobs = {kind: (kind, spec, seed, str(tmp), seqs[kind], threads) for kind in ("mistral", "mixtral")}
            done = _train_models(jobs, workers)
        for kind in ("mistral", "mixtral"):
            m.data["timings_s"].update(done[kind]["timings"])
        questions, _ = mmlu_pro.load(tmp / "mmlu_pro")
        ch = chance(questions)
        acc = {s: {kind: done[kind]["accuracy"][s] for kind in done} for s in SCORINGS}
        m.metric("experts", done["mixtral"]["experts"])
        m.metrics(
            accuracy=acc,
            scorings=SCORINGS,
            chance=ch,
            targets={k: headroom(a, ch) for k, a in acc["cloze"].items()},
            cot_targets=cot_targets(acc, ch),
            models={kind: done[kind]["info"] for kind in done},
            threads=threads,
            workers=workers,
            sizes={s: len(v) for s, v in splits.items()},
            tokenizer_vocab=len(tok),
            cot_documents={kind: sum(not isinstance(a, int) for _, a in seqs[kind]) for kind in seqs},
        )
        for name, rel in (
            ("mixtral", "mixtral"),
            ("mistral", "mistral"),
            ("mmlu_pro", "mmlu_pro"),
            ("finetune", "finetune"),
            ("calib", "calib"),
            ("tokenizer", "tokenizer"),
        ):
            m.output(name, tmp / rel)
            m.data["outputs"][name]["path"] = str(out / rel)  # where it lives once the temp dir is renamed
        m.save(tmp)
    return out


def _build_kw(args) -> dict:
    return dict(quick=args.quick, seed=args.seed, force=args.force)


def cli_toy(args) -> int:
    t = time.perf_counter()
    from helpers.core.manifest import resolve

    out = build_world(resolve(args.out) if args.out == "runs/toy/world" else args.out, **_build_kw(args))
    print(summary(out))
    print(f"toy world: {out} ({time.perf_counter() - t:.1f} s)")
    return 0
