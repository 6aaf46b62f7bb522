"""On-device generation: a GPT-2-shaped keras-hub LM as one LiteRT file (prefill + decode, key-value cache).

A `GPT2CausalLM` built from its config (byte vocabulary of 256, hidden 128, 4
blocks of 4 heads, feed-forward 512, max_sequence_length 256, about 0.9M
parameters) is trained very briefly on the bytes of the installed Keras's
Python files (`keras/src`, sorted, shuffled with seed 0; nothing is
downloaded), so that its greedy continuations are not a random model's. It is
written with `tfopt.export_generator` (max_length 256, prompts up to 64
tokens) in float32 and int4_block32, and each file generates greedily in the
`ai_edge_litert` interpreter (`tfopt.litert.Generator`, one thread, XNNPACK)
from a few 32-byte prompts taken from files the model did not train on.

Columns: file size; token identity: prompts whose generated tokens are all
Keras's (`lm.generate` with a greedy sampler, the prompt padded to prompt +
new tokens), and the fraction of tokens before the first difference; decode
tokens per second (decode calls only) and prefill milliseconds (one call on the
prompt padded to 64 tokens), medians over `--rounds` rounds; and, for
comparison, Keras's own compiled `lm.generate` on TensorFlow (all CPU threads)
in tokens per second.

Usage:
    python benchmarks/generation.py            # about 3 minutes on 2 CPU cores; prints the table
    python benchmarks/generation.py --write    # and writes it to RESULTS.md (section "generation")
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import byte_windows, keras_source_files  # noqa: E402 (after the path)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VOCABULARY = 256  # bytes
MAX_LENGTH = 256
PROMPT_LENGTH = 64
PRECISIONS = ("float32", "int4_block32")


def _prompts(root, paths, count, length):
    """`count` prompts of `length` bytes, from the middle of files the model did not train on."""
    import numpy as np

    prompts = []
    for path in reversed(paths):
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
        if len(data) > 4 * length:
            middle = len(data) // 2
            prompts.append(np.frombuffer(data[middle:middle + length], np.uint8).astype("int32"))
        if len(prompts) == count:
            return prompts
    return prompts


def _lm():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCABULARY, num_layers=4, num_heads=4, hidden_dim=128,
                                             intermediate_dim=512, max_sequence_length=MAX_LENGTH)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _train(lm, windows, epochs, batch):
    import keras
    import numpy as np

    x = {"token_ids": windows[:, :-1], "padding_mask": np.ones_like(windows[:, :-1], bool)}
    lm.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               weighted_metrics=[])
    history = lm.fit(x, windows[:, 1:], batch_size=batch, epochs=epochs, verbose=0)
    return history.history["loss"][-1]


def _keras_greedy(lm, prompt, new_tokens):
    """Keras's greedy generation (`lm.generate`, GreedySampler): prompt + `new_tokens` tokens, and its seconds."""
    import numpy as np

    length = len(prompt) + new_tokens
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, :len(prompt)] = prompt
    padding_mask = np.zeros((1, length), bool)
    padding_mask[0, :len(prompt)] = True
    start = time.perf_counter()
    out = lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    return np.asarray(out["token_ids"])[0], time.perf_counter() - start


def _agreement(got, expected, prompt_length):
    import numpy as np

    got, expected = got[prompt_length:], expected[prompt_length:]
    differs = np.flatnonzero(got != expected)
    return (differs[0] if differs.size else len(got)), len(got)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=768, help="training windows of 128 bytes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    args = parser.parse_args()

    import keras
    import keras_hub
    import numpy as np

    import tfopt
    from _common import table, write_section

    keras.utils.set_random_seed(0)
    root, paths = keras_source_files()
    lm = _lm()
    start = time.perf_counter()
    loss = _train(lm, byte_windows(root, paths, 128, args.windows), args.epochs, args.batch)
    print(f"trained {lm.count_params():,} parameters on {args.windows} windows x {args.epochs} epochs in "
          f"{time.perf_counter() - start:.0f} s: last loss {loss:.3f} (uniform: {np.log(VOCABULARY):.3f})")
    prompts = _prompts(root, paths, args.prompts, 32)
    lm.compile(sampler=keras_hub.samplers.GreedySampler())
    _keras_greedy(lm, prompts[0], args.new_tokens)  # (traces lm.generate)
    references, keras_seconds = [], []
    for prompt in prompts:
        tokens, seconds = _keras_greedy(lm, prompt, args.new_tokens)
        references.append(tokens)
        keras_seconds.append(seconds)
    keras_tps = args.new_tokens / statistics.median(keras_seconds)

    rows = []
    directory = tempfile.mkdtemp()
    for precision in PRECISIONS:
        report = tfopt.export_generator(lm, os.path.join(directory, f"{precision}.tflite"), max_length=MAX_LENGTH,
                                        prompt_length=PROMPT_LENGTH, precision=precision)
        print(report)
        generator = tfopt.litert.Generator(report.path, num_threads=1)
        identical, same, total = 0, 0, 0
        for prompt, expected in zip(prompts, references):
            got = generator.generate(prompt, args.new_tokens)
            common, count = _agreement(got, expected, len(prompt))
            identical += common == count
            same, total = same + common, total + count
        generator.generate(prompts[0], 8)  # (warm-up)
        decode, prefill = [], []
        for _ in range(args.rounds):
            for prompt in prompts:
                generator.generate(prompt, args.new_tokens)
                decode.append(generator.stats.decode_tokens_per_second)
                prefill.append(generator.stats.prefill_ms)
        rows.append({
            "precision": precision,
            "file size": f"{report.size_bytes / 1e6:.2f} MB",
            "prompts identical to Keras": f"{identical}/{len(prompts)}",
            "tokens before the first difference": f"{same}/{total} ({same / total:.0%})",
            "decode tokens/s": f"{statistics.median(decode):.0f}",
            f"prefill ms ({PROMPT_LENGTH} tokens)": f"{statistics.median(prefill):.2f}",
        })
    columns = list(rows[0])
    # Decode cost grows with the cache length (keras-hub's layout: every decode step slices, updates,
    # transposes and re-stacks the whole cache): the same float32 model at shorter max_length.
    scaling = []
    for max_length in (64, 128, MAX_LENGTH):
        path = os.path.join(directory, f"float32-{max_length}.tflite")
        tfopt.export_generator(lm, path, max_length=max_length, prompt_length=32, check=False)
        generator = tfopt.litert.Generator(path, num_threads=1)
        generator.generate(prompts[0], 8)  # (warm-up)
        speeds = []
        for _ in range(args.rounds):
            generator.generate(prompts[0], 32)
            speeds.append(generator.stats.decode_tokens_per_second)
        scaling.append(f"max_length {max_length}: {statistics.median(speeds):.0f}")
    body = (
        f"GPT2CausalLM from config: byte vocabulary {VOCABULARY}, hidden 128, 4 blocks x 4 heads, feed-forward 512, "
        f"{lm.count_params():,} parameters, trained {args.epochs} epochs on {args.windows} 128-byte windows of "
        f"keras/src (last training loss {loss:.3f}; uniform {np.log(VOCABULARY):.3f}). Files from "
        f"`tfopt.export_generator(lm, path, max_length={MAX_LENGTH}, prompt_length={PROMPT_LENGTH}, precision=...)`, "
        f"run by `tfopt.litert.Generator` (ai_edge_litert, XNNPACK, one thread), greedy, {len(prompts)} prompts of "
        f"32 bytes from files not trained on, {args.new_tokens} new tokens each; speeds are medians over "
        f"{args.rounds} rounds. Token identity is against Keras's own greedy `lm.generate` "
        f"(`keras_hub.samplers.GreedySampler`), which runs at {keras_tps:.0f} tokens/s here (TensorFlow, compiled, "
        "all CPU threads).\n\n" + table(rows, columns)
        + "\n\nfloat32 decode tokens/s by the file's max_length (cache length; 32 new tokens after a 32-byte prompt): "
        + ", ".join(scaling) + ". Each decode step copies the whole cache several times (keras-hub's "
        "`call_with_cache` slices each layer's cache, updates one position, transposes keys and values for the "
        "attention and stacks them back; the file returns the cache), so export with the max_length you need.")
    print(body)
    if args.write:
        write_section("generation", "On-device generation: LiteRT prefill/decode with a key-value cache",
                      "python benchmarks/generation.py --write", body)


if __name__ == "__main__":
    main()
