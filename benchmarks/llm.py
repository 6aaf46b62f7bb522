"""A small causal language model shrunk by `tfopt.shrink` and recovered by distillation.

A Mistral-shaped keras-hub `MistralCausalLM` at GPT-2-like size (byte-level
vocabulary of 256, hidden 128, 4 blocks, 4 query heads in 2 key-value groups
of head size 32, gated feed-forward of 512, about 1.05M parameters) is trained
here on the bytes of the Python files of the installed Keras (`keras/src`,
files sorted, shuffled with seed 0, split train/validation by file), long
enough that its validation perplexity is far below the unigram model's.
Mistral, not GPT-2: keras-hub's GPT2Backbone derives the head size as
hidden_dim // num_heads, so fewer heads of the same size cannot be written in
its config; Mistral's config has `head_dim`.

Rows: the dense teacher; `tfopt.shrink(lm, 0.55, heads=0.5, data=calib)`
(55% of the feed-forward units of every block and half its key-value head
groups, no training: half the parameters, the embeddings staying whole); the
same distilled from the teacher (`tfopt.distillation.Distiller`, per-position
KL of the logits, on a third of the teacher's training tokens); the same
recipe with 25% of the hidden (residual) width removed too (`hidden=0.25`);
the same with a quarter of the blocks removed too (`depth=0.25`); the shape of
the first distilled row trained from scratch on the same tokens as the
distillation. Columns: parameters, multiply-adds of one prefill of `--seq`
tokens (`tfopt.reporting.macs(lm, sequence_length=...)`: projections,
attention scores and context over the full (seq, seq) matrix the file
computes, feed-forward, norms and the output head; element-wise ops and RoPE
not counted), validation perplexity (exp of the mean next-byte
crossentropy), float32 LiteRT file size, and LiteRT prefill latency (batch 1,
`--seq` tokens, one thread, medians of `--rounds` interleaved rounds of 50
runs), each as a ratio to the dense model. tfmot has no counterpart: it takes
tf_keras models only and cannot load keras-hub. `--arch gpt2`: a GPT2CausalLM
of the same size, for the axes its config can express (feed-forward units,
hidden width, depth), written to its own section.

`--part quantization`: int4 weights for the same kind of model, a
GPT2CausalLM (byte vocabulary 256, hidden 128, 4 blocks, 4 heads,
feed-forward 512, sequences of 128) trained on the same bytes (a shorter
pass), exported as float32, int8_weight_only, int4_weight_only (per-channel,
post-training), int4_block32 (post-training), and int4_block32 after a short
quantization-aware fine-tune (`tfopt.quantize_weights(lm, "int4_block32")`,
a fraction of an epoch), with a float fine-tune of the same length as a
control. Columns: file size, validation perplexity computed from the LiteRT
file's logits (every validation window, next-byte crossentropy) and from
the Keras model, each as a ratio to the float32 file, and prefill latency
(batch 1, one thread, medians of interleaved rounds).

Usage:
    python benchmarks/llm.py --write    # about 15 minutes on 2 CPU cores; writes RESULTS.md
    python benchmarks/llm.py --part quantization --write  # int4 rows (PTQ and QAT), < 10 minutes
    python benchmarks/llm.py --quick    # tiny sizes, a few steps, a smoke run (nothing written)
    python benchmarks/llm.py --arch gpt2 --write  # GPT-2 rows: feed-forward, hidden, depth (no heads)
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import byte_windows, keras_source_files  # noqa: E402 (after the path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VOCABULARY = 256  # bytes


def _split(windows):
    import numpy as np

    x = {"token_ids": windows[:, :-1], "padding_mask": np.ones_like(windows[:, :-1])}
    return x, windows[:, 1:]


def _lm(args, **overrides):
    import keras_hub

    if args.arch == "gpt2":
        config = dict(vocabulary_size=VOCABULARY, num_layers=args.layers, num_heads=args.heads,
                      hidden_dim=args.hidden, intermediate_dim=args.intermediate, max_sequence_length=args.seq)
        config.update(overrides)
        return keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone(**config), preprocessor=None)
    config = dict(vocabulary_size=VOCABULARY, num_layers=args.layers, num_query_heads=args.heads,
                  num_key_value_heads=args.kv_heads, hidden_dim=args.hidden, intermediate_dim=args.intermediate,
                  head_dim=args.hidden // args.heads, sliding_window=None)
    config.update(overrides)
    return keras_hub.models.MistralCausalLM(backbone=keras_hub.models.MistralBackbone(**config), preprocessor=None)


def _optimizer(peak, steps):
    import keras

    warmup = max(steps // 20, 1)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, max(steps - warmup, 1), alpha=0.05,
                                                      warmup_target=peak, warmup_steps=warmup)
    return keras.optimizers.Adam(schedule)


def _train(lm, x, y, args, peak):
    import keras

    steps = math.ceil(len(y) / args.batch)
    lm.compile(_optimizer(peak, steps), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               weighted_metrics=[])
    lm.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)  # (shuffled once, below)
    return lm


def _distill(teacher, student, x, y, args):
    import tfopt

    steps = math.ceil(len(y) / args.batch)
    distiller = tfopt.distillation.Distiller(teacher=teacher, student=student, temperature=1.0, alpha=0.0)
    distiller.compile(_optimizer(args.distill_lr, steps))
    distiller.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)  # (shuffled once, below)
    return student


def _perplexity(lm, x, y):
    import keras

    lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[])
    return math.exp(lm.evaluate(x, y, batch_size=64, verbose=0))


def _unigram_perplexity(train, validation):
    import numpy as np

    counts = np.bincount(train.reshape(-1), minlength=VOCABULARY) + 1.0
    log_p = np.log(counts / counts.sum())
    return math.exp(-log_p[validation[:, 1:].reshape(-1)].mean())


def _macs(lm, seq):
    """Multiply-adds of one prefill of `seq` tokens, as `tfopt.reporting.macs` counts them."""
    import tfopt

    return tfopt.reporting.total_macs(tfopt.reporting.macs(lm, sequence_length=seq))


def _export(lm, ids, path):
    """The float32 LiteRT file of `lm` at `ids`'s sequence length (bytes), and the file's input order."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    import tfopt

    with warnings.catch_warnings():  # the fixed sequence length is what this benchmark wants
        warnings.filterwarnings("ignore", message=r"tfopt.export: model .* converts only at fixed input shapes")
        report = tfopt.export(lm, path, inputs={"token_ids": ids, "padding_mask": np.ones_like(ids)})
    with open(report.path, "rb") as f:
        content = f.read()
    names = [d["name"] for d in Interpreter(model_content=content).get_input_details()]
    return content, ["token_ids" if "token_ids" in n else "padding_mask" for n in names], report.max_abs_diff


def _interleaved_latency(files, ids, rounds):
    import numpy as np

    from tfopt.litert import litert_latency_ms

    arrays = {"token_ids": ids[:1], "padding_mask": np.ones_like(ids[:1])}
    times = {k: [] for k in files}
    for _ in range(rounds):
        for key, (content, order) in files.items():
            times[key].append(litert_latency_ms(content, [arrays[name] for name in order]))
    return {k: statistics.median(v) for k, v in times.items()}


def _export_precision(lm, ids, path, precision):
    """(report, file bytes, file input order) of `lm` exported in `precision` at `ids`'s shape."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    import tfopt

    with warnings.catch_warnings():  # (fixed sequence length; int4's agreement warning on a few windows)
        warnings.simplefilter("ignore")
        report = tfopt.export(lm, path, precision=precision,
                              inputs={"token_ids": ids, "padding_mask": np.ones_like(ids)})
    with open(report.path, "rb") as f:
        content = f.read()
    names = [d["name"] for d in Interpreter(model_content=content).get_input_details()]
    return report, content, ["token_ids" if "token_ids" in n else "padding_mask" for n in names]


def _file_perplexity(content, order, x, y, chunk=50):
    """exp of the mean next-byte crossentropy of the LiteRT file's logits over every validation target
    (`order`: the file's input names, in its order: the file has no signature to feed by name)."""
    import numpy as np

    from tfopt import litert

    total, count = 0.0, 0
    for i in range(0, len(y), chunk):
        logits = np.asarray(litert.run_litert(content, [x[name][i:i + chunk] for name in order])[0], "float64")
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        total += float((log_z - np.take_along_axis(logits, y[i:i + chunk, :, None], -1)[..., 0]).sum())
        count += y[i:i + chunk].size
    return math.exp(total / count)


def quantization(args):
    """`--part quantization` (module docstring)."""
    import keras
    import numpy as np

    import tfopt
    from _common import table, write_section

    started = time.perf_counter()

    def say(*parts):
        print(f"[{time.perf_counter() - started:6.0f} s]", *parts, flush=True)

    args.arch = "gpt2"
    root, paths = keras_source_files()
    cut = len(paths) // 10
    validation = byte_windows(root, paths[:cut], args.seq, args.validation)
    train = byte_windows(root, paths[cut:], args.seq, args.train)
    train = train[np.random.default_rng(0).permutation(len(train))]
    x_val, y_val = _split(validation)
    x_train, y_train = _split(train)
    tune = max(int(len(train) * args.qat_fraction), args.batch)
    x_tune, y_tune = _split(train[np.random.default_rng(1).permutation(len(train))[:tune]])
    say(f"train {train.size:,} bytes, validation {validation.size:,}; fine-tune {tune} windows")

    keras.utils.set_random_seed(0)
    lm = _train(_lm(args), x_train, y_train, args, args.lr)
    weights = lm.get_weights()
    say("float model trained")

    keras.utils.set_random_seed(5)
    qat = _lm(args)
    qat.set_weights(weights)
    tfopt.quantize_weights(qat, "int4_block32")
    _train(qat, x_tune, y_tune, args, args.qat_lr)
    say("int4_block32 QAT fine-tuned")
    keras.utils.set_random_seed(5)
    qat8 = tfopt.quantize_model(lm, "int8")  # a copy: weights and activations fake-quantized
    _train(qat8, x_tune, y_tune, args, args.qat_lr)
    say("int8 QAT fine-tuned")
    keras.utils.set_random_seed(5)
    control = _lm(args)
    control.set_weights(weights)
    _train(control, x_tune, y_tune, args, args.qat_lr)
    say("float control fine-tuned")

    rows_spec = [("float32", lm, "float32"), ("int8_weight_only (PTQ)", lm, "int8_weight_only"),
                 ("int4_weight_only (PTQ, per channel)", lm, "int4_weight_only"),
                 ("int4_block32 (PTQ)", lm, "int4_block32"), ("int4_block32 QAT", qat, "int4_block32"),
                 ("int8 QAT (full integer)", qat8, "int8"),
                 ("float32, fine-tuned as long (control)", control, "float32"),
                 ("int4_block32 (PTQ of the control)", control, "int4_block32")]
    ids = validation[:4, :-1]
    out = tempfile.mkdtemp()
    files, results = {}, {}
    keras_perplexity = {}
    for i, (key, model, precision) in enumerate(rows_spec):
        report, content, order = _export_precision(model, ids, os.path.join(out, f"{i}.tflite"), precision)
        files[key] = (content, order)
        if id(model) not in keras_perplexity:
            keras_perplexity[id(model)] = _perplexity(model, x_val, y_val)
        results[key] = {"bytes": len(content), "file": _file_perplexity(content, order, x_val, y_val),
                        "keras": keras_perplexity[id(model)], "diff": report.max_abs_diff,
                        "float ops": ", ".join(sorted(set(report.float_ops))) if precision == "int8" else ""}
        say(key, results[key], f"(report on {len(ids)} windows: {report.perplexity:.4f} file, "
            f"{report.keras_perplexity:.4f} Keras)")
    latency = _interleaved_latency(files, ids, args.rounds)

    base = results["float32"]
    rows = []
    for key, _, precision in rows_spec:
        r = results[key]
        size, ppl = r["bytes"] / base["bytes"], r["file"] / base["file"]
        target = ""
        if precision.startswith("int4"):
            most = 1.02 if key.endswith("QAT") else 1.05
            met = size <= 0.2 and ppl <= most
            target = f"{'MET' if met else 'MISSED'}: size {size:.3f}x (<= 0.20), perplexity {ppl:.3f}x (<= {most:.2f})"
        rows.append({"model": key, "LiteRT bytes": f"{r['bytes']:,}", "size ratio": f"{size:.3f}",
                     "file perplexity": f"{r['file']:.4f}", "perplexity ratio": f"{ppl:.4f}",
                     "Keras perplexity": f"{r['keras']:.4f}", "max |file - Keras| (4 windows)": f"{r['diff']:.3g}",
                     "latency ms": f"{latency[key]:.2f}",
                     "latency ratio": f"{latency[key] / latency['float32']:.2f}",
                     "float ops": r["float ops"] or ("none" if precision == "int8" else ""), "targets": target})
        print(rows[-1], flush=True)
    body = (
        f"A keras-hub `GPT2CausalLM` (byte vocabulary {VOCABULARY}, hidden {args.hidden}, {args.layers} blocks, "
        f"{args.heads} heads, feed-forward {args.intermediate}, sequences of {args.seq}; {lm.count_params():,} "
        f"parameters) trained on {y_train.size:,} next-byte targets of the installed Keras's Python files "
        f"(`keras/src`, split by file; {y_val.size:,} validation targets), Adam, peak learning rate {args.lr}, "
        f"warm-up then cosine decay, batch {args.batch}, one pass. QAT: `tfopt.quantize_weights(lm, "
        f"'int4_block32')` on the trained weights (every attention and feed-forward kernel and the tied output "
        f"head fake-quantized on LiteRT's int4 grid, blocks of 32 inputs), then {y_tune.size:,} targets "
        f"({args.qat_fraction:.0%} of an epoch, windows drawn from the training set), peak learning rate "
        f"{args.qat_lr}, and `tfopt.export(qat, path, precision='int4_block32')`. int8 QAT: "
        "`tfopt.quantize_model(lm, 'int8')` (every block's attention, norms, feed-forward and residual sums, "
        "the tables and the head with trained ranges), the same fine-tune, and an int8 export from those "
        "ranges alone (no calibration data; its float ops column says what stayed float). The control is the float "
        "model fine-tuned on the same windows with the same schedule (the QAT row's extra training, without "
        "the quantizer). PTQ rows: `tfopt.export(lm, path, precision=...)` of the float model (LiteRT's "
        "quantizer on the float file; int4_block32 also quantizes activations to int8 at run time, "
        "int4/int8_weight_only dequantize the weights and compute in float). Perplexity: exp of the mean "
        "next-byte crossentropy of the LiteRT file's logits over every validation target (the Keras column: "
        "the same from the Keras model that was exported); size and perplexity ratios to the float32 file; "
        f"prefill latency at batch 1, {args.seq} tokens, one thread, medians of {args.rounds} interleaved "
        "rounds of 50 runs. Embeddings: the tied token table is stored once, in the file's precision, shared by "
        "the lookup and the output head (tfopt rewrites the converter's GATHER as an EMBEDDING_LOOKUP, whose "
        "table LiteRT's quantizer takes and the interpreter runs from integers; `quantize_weights` puts it on "
        f"the same grid); the position table ({args.seq} positions = max_sequence_length = --seq, "
        f"{args.seq * args.hidden:,} parameters) stays float32 in every file, since keras-hub's "
        "PositionEmbedding slices it rather than looking it up. Targets: an int4 file at most 0.2x the float file with perplexity at most 5% above float "
        "(PTQ) and at most 2% (QAT).\n\n" + table(rows, list(rows[0]))
        + f"\n\nTotal run time {time.perf_counter() - started:.0f} s.")
    print(body)
    if args.write:
        write_section("llm-int4", "Large language models: int4 weights, post-training and quantization-aware",
                      "python benchmarks/llm.py --part quantization --write", body)


def main(args):
    import keras
    import numpy as np

    import tfopt
    from _common import table, write_section

    started = time.perf_counter()

    def say(*parts):
        print(f"[{time.perf_counter() - started:6.0f} s]", *parts, flush=True)

    root, paths = keras_source_files()
    cut = len(paths) // 10
    validation = byte_windows(root, paths[:cut], args.seq, args.validation)
    train = byte_windows(root, paths[cut:], args.seq, args.train)
    train = train[np.random.default_rng(0).permutation(len(train))]  # windows of one file spread over the pass
    x_val, y_val = _split(validation)
    x_train, y_train = _split(train)
    budget = len(train) // 3  # the distillation and from-scratch rows: a third of the teacher's tokens
    x_budget, y_budget = _split(train[:budget])
    calibration = train[: args.calibration, :-1]
    unigram = _unigram_perplexity(train, validation)
    say(f"{len(paths)} files; train {train.size:,} bytes, validation {validation.size:,}; unigram perplexity "
        f"{unigram:.2f}")

    keras.utils.set_random_seed(0)
    dense = _train(_lm(args), x_train, y_train, args, args.lr)
    dense.trainable = False
    say("teacher trained")

    # GPT-2 cannot lose heads (see the module docstring): its rows remove feed-forward units, hidden, depth.
    ffn = f"{args.ffn:.0%} feed-forward"
    heads, what = ({}, ffn) if args.arch == "gpt2" else ({"heads": 0.5}, f"50% heads + {ffn}")
    first = f"{what}, distilled"
    models = {"dense (teacher)": dense}
    models[f"{what}, one-shot"] = tfopt.shrink(dense, args.ffn, **heads, data=calibration)
    keras.utils.set_random_seed(1)
    models[first] = _distill(dense, tfopt.shrink(dense, args.ffn, **heads, data=calibration), x_budget, y_budget, args)
    say(f"distilled: {what}")
    keras.utils.set_random_seed(2)
    models["+ 25% hidden, distilled"] = _distill(
        dense, tfopt.shrink(dense, args.ffn, **heads, hidden=0.25, data=calibration), x_budget, y_budget, args)
    say("distilled: + 25% hidden")
    keras.utils.set_random_seed(3)
    models["+ 25% hidden + depth -25%, distilled"] = _distill(
        dense, tfopt.shrink(dense, args.ffn, **heads, hidden=0.25, depth=0.25, data=calibration), x_budget, y_budget,
        args)
    say("distilled: + depth -25%")
    small = models[first].backbone.get_config()
    keras.utils.set_random_seed(4)
    shape = ("intermediate_dim",) if args.arch == "gpt2" else ("num_query_heads", "num_key_value_heads",
                                                                 "intermediate_dim")
    models["the first distilled shape, from scratch"] = _train(_lm(args, **{k: small[k] for k in shape}), x_budget, y_budget, args,
                                               args.lr)
    say("trained from scratch")

    ids = validation[: 4, :-1]
    files, results = {}, {}
    out = tempfile.mkdtemp()
    for i, (key, lm) in enumerate(models.items()):
        content, order, difference = _export(lm, ids, os.path.join(out, f"{i}.tflite"))
        files[key] = (content, order)
        results[key] = {"params": lm.count_params(), "macs": _macs(lm, args.seq),
                        "perplexity": _perplexity(lm, x_val, y_val), "bytes": len(content), "diff": difference}
        say(key, results[key])
    latency = _interleaved_latency(files, ids, args.rounds)

    base = results["dense (teacher)"]
    scratch = results["the first distilled shape, from scratch"]["perplexity"]
    rows = []
    for key, r in results.items():
        params, macs = r["params"] / base["params"], r["macs"] / base["macs"]
        perplexity, lat = r["perplexity"] / base["perplexity"], latency[key] / latency["dense (teacher)"]
        target = ""
        if key.endswith("distilled"):
            met = params <= 0.5 and perplexity <= 1.10
            target = (f"{'MET' if met else 'MISSED'}: params {params:.2f}x (<= 0.50), perplexity "
                      f"{perplexity:.3f}x (<= 1.10)")
            if key == first:
                target += f"; {'beats' if r['perplexity'] < scratch else 'does not beat'} from scratch " \
                          f"({r['perplexity']:.3f} vs {scratch:.3f})"
        rows.append({
            "model": key, "params": f"{r['params']:,}", "params ratio": f"{params:.2f}",
            "MACs (M)": f"{r['macs'] / 1e6:.1f}", "MACs ratio": f"{macs:.2f}",
            "val perplexity": f"{r['perplexity']:.3f}", "perplexity ratio": f"{perplexity:.3f}",
            "LiteRT bytes": f"{r['bytes']:,}", "latency ms": f"{latency[key]:.2f}", "latency ratio": f"{lat:.2f}",
            "latency / MACs ratio": f"{lat / macs:.2f} ({'MET' if 0.85 <= lat / macs <= 1.15 else 'MISSED'})"
            if key != "dense (teacher)" else "", "targets": target,
        })
        print(rows[-1], flush=True)
    columns = list(rows[0])
    if args.arch == "gpt2":
        model = (f"A keras-hub `GPT2CausalLM` (byte vocabulary {VOCABULARY}, hidden {args.hidden}, {args.layers} "
                 f"blocks, {args.heads} heads, feed-forward {args.intermediate}, sequences of {args.seq})")
        why = ("GPT-2 rows for the axes its config can express: GPT2Backbone derives the head size as hidden_dim // "
               "num_heads, so it cannot lose heads (the Mistral section above does).")
        call, export_note = f"tfopt.shrink(lm, {args.ffn}[, hidden=0.25][, depth=0.25]", ""
    else:
        model = (f"A keras-hub `MistralCausalLM` (byte vocabulary {VOCABULARY}, hidden {args.hidden}, {args.layers} "
                 f"blocks, {args.heads} query heads in {args.kv_heads} key-value groups of head size "
                 f"{args.hidden // args.heads}, gated feed-forward {args.intermediate}, sequences of {args.seq})")
        why = ("Mistral, not GPT-2: GPT2Backbone derives the head size as hidden_dim // num_heads, so fewer heads "
               "cannot be written in its config; Mistral's has `head_dim`.")
        call = f"tfopt.shrink(lm, {args.ffn}, heads=0.5[, hidden=0.25][, depth=0.25]"
        export_note = " (keras-hub's Mistral attention needs a TF Select op at a free length)"
    body = (
        f"{model} trained on {train[:, 1:].size:,} next-byte targets of the installed Keras's Python files "
        f"(`keras/src`, split by file; {validation[:, 1:].size:,} validation targets; unigram perplexity "
        f"{unigram:.2f}), Adam, peak learning rate {args.lr}, warm-up then cosine decay, batch {args.batch}, one "
        f"pass. {why} Shrunk with `{call}, data=<{args.calibration} training sequences>)`; distilled with "
        "`tfopt.distillation.Distiller(teacher=dense, student=..., temperature=1, alpha=0)` (per-position KL of "
        f"the logits) on a third of the teacher's training sequences ({y_budget.size:,} targets, one pass, peak "
        f"learning rate {args.distill_lr}); 'from scratch': the first distilled row's shape trained on the same "
        f"third with labels (peak learning rate {args.lr}). MACs: one prefill of {args.seq} tokens as "
        "`tfopt.reporting.macs(lm, sequence_length=...)` counts them (projections, grouped-query attention "
        "scores and context, feed-forward, norms, the tied output head; element-wise ops and RoPE not counted). "
        f"The feed-forward share, {args.ffn}, is what brings the first shrunk row to half the parameters (the "
        "embeddings are not cut by heads and feed-forward units). LiteRT: float32 `tfopt.export` at sequence "
        f"length {args.seq}{export_note}; prefill latency at batch 1, one thread, medians of {args.rounds} "
        "interleaved rounds of 50 runs. Targets: half the parameters with at most 10% higher perplexity after "
        "distillation on at most a third of the teacher's tokens, better than the same shape from scratch on "
        "those tokens; latency within 15% of the MACs ratio. tfmot has no row: it takes tf_keras models only "
        "and cannot load keras-hub.\n\n" + table(rows, columns)
        + f"\n\nTotal run time {time.perf_counter() - started:.0f} s.")
    print(body)
    if args.write:
        if args.arch == "gpt2":
            write_section("llm-gpt2", "Large language models: the same with GPT-2 (feed-forward, hidden, depth)",
                          "python benchmarks/llm.py --arch gpt2 --write", body)
        else:
            write_section("llm", "Large language models: shrink + distill a byte-level causal LM",
                          "python benchmarks/llm.py --write", body)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps; writes nothing")
    parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    parser.add_argument("--arch", choices=["mistral", "gpt2"], default="mistral")
    parser.add_argument("--part", choices=["shrink", "quantization"], default="shrink",
                        help="shrink + distill rows (default), or int4 weight rows (GPT-2, PTQ and QAT)")
    parser.add_argument("--qat-fraction", type=float, default=0.25, help="share of an epoch the QAT fine-tune sees")
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--train", type=int, default=24000, help="training sequences for the teacher")
    parser.add_argument("--validation", type=int, default=1000, help="validation sequences")
    parser.add_argument("--calibration", type=int, default=64, help="training sequences shrink scores on")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--ffn", type=float, default=0.55, help="share of feed-forward units removed")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--distill-lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.write = False
        args.train, args.validation, args.calibration, args.seq, args.rounds = 96, 32, 8, 32, 2
        args.hidden, args.intermediate = 32, 64
    elif args.part == "quantization" and args.train == 24000:
        args.train = 8000  # (the whole part within 10 minutes on 2 cores)
    quantization(args) if args.part == "quantization" else main(args)
