"""Misuses of pruning (layers, callback, transforms) and what tfopt says."""

import importlib.util

import keras
import numpy as np

import tfopt
from tests.misuse.harness import Misuse, MisuseTestCase


def _mlp(units=8, head=2, built=True):
    layers = [keras.layers.Dense(units, name="hidden"), keras.layers.Dense(head, name="head")]
    return keras.Sequential(([keras.Input((4,))] if built else []) + layers, name="mlp")


def _fit(model, callbacks, steps=2, compile=True):
    """`steps` training steps of batch 4 on random data."""
    if compile:
        model.compile("adam", "mse")
    n = 4 * steps
    model.fit(np.random.rand(n, 4), np.random.rand(n, model.outputs[0].shape[-1]), batch_size=4, verbose=0,
              callbacks=callbacks)
    return model


class _Gated(keras.layers.Layer):
    """Keras's custom-layer guide pattern: the weight is `self.w`, not `kernel`."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), name="w")

    def call(self, x):
        return keras.ops.matmul(x, self.w)


def _inf_model():
    model = _mlp()
    kernel = model.get_layer("hidden").kernel
    kernel.assign(np.where(np.arange(kernel.shape[1]) == 0, np.inf, kernel.numpy()))
    return model


class _PoisonAt(keras.callbacks.Callback):
    """Writes NaN into a kernel mid-fit, as a diverging step would."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            kernel = self.model.get_layer("hidden").kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


class _FirstEpochBest(keras.callbacks.Callback):
    """Logs a score that is best at the first epoch, so EarlyStopping restores it."""

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = -float(epoch)


def _restored_earlier_epoch():
    """Sparsity rises over 3 epochs; EarlyStopping (before Pruning in the list, so its
    `on_train_end` runs first) hands back the first, least sparse epoch."""
    model = _mlp(units=16)
    model.compile("adam", "mse")
    schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=6, frequency=1)
    stop = keras.callbacks.EarlyStopping(monitor="score", mode="max", patience=10, restore_best_weights=True)
    rng = np.random.default_rng(0)
    model.fit(rng.random((8, 4)), rng.random((8, 2)), batch_size=4, epochs=3, verbose=0,
              callbacks=[_FirstEpochBest(), stop, tfopt.callbacks.Pruning(schedule)])


def _always():
    return tfopt.schedules.ConstantSparsity(0.5, frequency=1)


def _summary_of_path(name, make=None):
    """`tfopt.summary` of the path `name` in a fresh temporary directory, after `make(path)` made it."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, name)
        if make is not None:
            make(path)
        return tfopt.summary(path, print_fn=None)


def _make_directory(path):
    import os

    os.mkdir(path)


def _write_text(path):
    with open(path, "w") as f:
        f.write("hello")


def _save_lambda_model(path):
    keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(2)]).save(path)


TABLE = [
    Misuse(
        "structured pruning would remove every channel of a layer",
        lambda: _fit(_mlp(), [tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.8, frequency=1),
                                                      structure="channel", layers="head")]),
        warns=UserWarning, match=r"Layer 'head'.*channel pruning at sparsity 0.8 would remove all 2 "
                                 r"channel.*keeps the largest one.*Fix"),
    Misuse(
        "a pruning block larger than the weight",
        lambda: tfopt.prune(_mlp(), "baseline", structure=(8, 8), layers="head"),
        raises=ValueError, match=r"Layer 'head'.*block \(8, 8\) covers the whole weight.*Fix: a smaller"),
    Misuse(
        "pruning a model whose weights hold Inf",
        lambda: tfopt.prune(_inf_model(), "baseline"),
        raises=ValueError, match=r"Layer 'hidden' weight 'kernel' holds 4 NaN/Inf.*Fix the weights"),
    Misuse(
        "weights turning NaN during a pruned fit",
        lambda: _fit(_mlp(), [tfopt.callbacks.Pruning(_always()), _PoisonAt()], steps=4),
        warns=UserWarning, match=r"\['hidden/kernel'.*\] hold NaN/Inf.*masks stopped updating.*sparsity"),
    Misuse(
        "tfopt.prune of a Sequential model that was never built",
        lambda: tfopt.prune(_mlp(built=False), "baseline"),
        raises=ValueError, match=r"model 'mlp' was never built.*Fix: start it with `keras.Input"),
    Misuse(
        "the Pruning callback on a custom layer whose weight is not called kernel",
        lambda: _fit(keras.Sequential([keras.Input((4,)), _Gated(name="gated"), keras.layers.Dense(2)]),
                     [tfopt.callbacks.Pruning(_always())]),
        warns=UserWarning, match=r"layers \['gated \(_Gated\)'\].*stay dense.*tfopt.geometry.register"),
    Misuse(
        "the Pruning callback on a model with nothing to prune",
        lambda: _fit(keras.Sequential([keras.Input((4,)), _Gated(name="gated")]),
                     [tfopt.callbacks.Pruning(_always())]),
        raises=ValueError, match=r"model 'sequential\w*' has no weight tfopt can prune.*Fix: register"),
    Misuse(
        "a Pruning callback without a schedule on a model without tfopt layers",
        lambda: _fit(_mlp(), [tfopt.callbacks.Pruning()]),
        raises=ValueError, match=r"without a `pruning_schedule`.*model 'mlp' has none.*Fix: pass a schedule"),
    Misuse(
        "two Pruning callbacks in one fit",
        lambda: _fit(_mlp(), [tfopt.callbacks.Pruning(_always()), tfopt.callbacks.Pruning("baseline")]),
        raises=ValueError, match=r"Two tfopt.callbacks.Pruning callbacks in one `fit` of model 'mlp'.*Use one"),
    Misuse(
        "a schedule in percentages spread over several fit calls",
        lambda: [_fit(model, [tfopt.callbacks.Pruning("gradual")], compile=i == 0)
                 for model in [_mlp()] for i in range(2)],
        warns=UserWarning, match=r"resolves against this fit's 2 steps.*already done 2.*total_steps="),
    Misuse(
        "a fit that ends before the pruning schedule does",
        lambda: _fit(_mlp(), [tfopt.callbacks.Pruning(tfopt.schedules.PolynomialDecay(0.0, 0.8, 0, 100,
                                                                                       frequency=1))]),
        warns=UserWarning, match=r"ended at step 2, before the schedule's end_step 100.*not 0.8.*Keep this"),
    Misuse(
        "a bad total_steps for the Pruning callback",
        lambda: tfopt.callbacks.Pruning("gradual", total_steps=0),
        raises=ValueError, match=r"`total_steps` must be a positive int.*Received: total_steps=0"),
    Misuse(
        "a PolynomialDecay whose sparsity falls",
        lambda: tfopt.schedules.PolynomialDecay(0.5, 0.2, begin_step=0, end_step=10),
        raises=ValueError, match=r"`final_sparsity` must be at least `initial_sparsity`.*Received: "
                                 r"initial_sparsity=0.5, final_sparsity=0.2. Fix"),
    Misuse(
        "EarlyStopping(restore_best_weights=True) hands back a less sparse epoch",
        _restored_earlier_epoch,
        warns=UserWarning, match=r"at the end of `fit`, \d+ of the \d+ pruned weights of model 'mlp' are not "
                                 r"zero.*EarlyStopping\(restore_best_weights=True\).*Fix"),
    Misuse("shrink with a fraction of 1 or more",
           lambda: tfopt.shrink(_mlp(), 1.0), raises=ValueError,
           match=r"`tfopt.shrink\(fraction=...\)` is the share of each group's channels to remove, a number in "
                 r"\[0, 1\), or None for the units pruning already zeroed\. Received: fraction=1.0"),
    Misuse("shrink of a model with tfopt layers",
           lambda: tfopt.shrink(tfopt.prune(_mlp(), "baseline"), 0.5), raises=TypeError,
           match=r"`tfopt.shrink` takes a plain Keras model, and layer 'hidden' is a tfopt Dense\. "
                 r"Fix: `tfopt.strip\(model\)` first"),
    Misuse("shrink by Taylor importance without data",
           lambda: tfopt.shrink(_mlp(), 0.5, importance="taylor"), raises=ValueError,
           match=r"`importance='taylor'` scores channels by \|weight x gradient\| and needs `data`.*"
                 r"Fix: pass both, or use importance='l2'"),
    Misuse("WidthPruning of a model with nothing to remove",
           lambda: _fit(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="one"),
                        [tfopt.callbacks.WidthPruning("baseline")]),
           raises=ValueError,
           match=r"tfopt.callbacks.WidthPruning: model 'one' has no channel, head or unit it can remove .*"
                 r"Fix: use Pruning\(structure='channel'\) or unstructured pruning"),
    Misuse("shrink without a fraction after channel pruning of producers only",
           lambda: tfopt.shrink(tfopt.strip(_fit(_mlp(), [tfopt.callbacks.Pruning(
               tfopt.schedules.ConstantSparsity(0.5, frequency=1), structure="channel")]))),
           logs="tfopt",
           match=r"tfopt.shrink\(model\) found no channel, head or unit that is zero wherever it is read and "
                 r"written, so it removed nothing.*train with tfopt.callbacks.WidthPruning, or pass a fraction"),
    Misuse("shrink by Taylor importance on data holding NaN",
           lambda: tfopt.shrink(_mlp(), 0.5, importance="taylor", loss="mse",
                                data=[(np.where(np.eye(4) == 1, np.nan, 1.0), np.ones((4, 2)))]),
           raises=ValueError,
           match=r"`tfopt.shrink\(importance='taylor'\)`: `data` batch 0 holds 4 NaN/Inf value\(s\) in its x "
                 r"\(shape \(4, 4\)\); the gradients, and so every channel score, would be NaN.*Fix: drop or fill"),
    Misuse("shrink by Taylor importance on data that is not (x, y) batches",
           lambda: tfopt.shrink(_mlp(), 0.5, importance="taylor", loss="mse", data=[np.ones((4, 4))]),
           raises=ValueError,
           match=r"`data` is a batch `\(x, y\)` or a list of them, and its item 0 is not an \(x, y\) pair\. "
                 r"Received: an item of type ndarray and shape \(4, 4\)\. Fix: data=\[\(x\[:256\], y\[:256\]\)\]"),
    Misuse("shrink of a model whose weights hold NaN or Inf",
           lambda: tfopt.shrink(_inf_model(), 0.5), raises=ValueError,
           match=r"tfopt.shrink: the channel scores of weights \['mlp/hidden/kernel'\] are NaN/Inf "
                 r"\(importance='l2', from the weights' squares\), so which channels go would be arbitrary\. Fix"),
    Misuse("tfopt.summary of something that is neither a model nor a path",
           lambda: tfopt.summary(3), raises=TypeError,
           match=r"`tfopt.summary` takes a Keras model or the path of a `.keras` file\. Received: model=3 of type "
                 r"int\. Fix: pass the model"),
    Misuse("tfopt.summary of a directory",
           lambda: _summary_of_path("saved_model", make=_make_directory), raises=IsADirectoryError,
           match=r"`tfopt.summary`: model='.*' is a directory \(a SavedModel\?\), not a Keras model or a `.keras` "
                 r"file\. Fix: pass the Keras model, or save it with model.save\('model.keras'\)"),
    Misuse("tfopt.summary of a path with no file",
           lambda: _summary_of_path("missing.keras"),
           raises=FileNotFoundError, match=r"`tfopt.summary`: no file at model='.*missing.keras'\. Fix"),
    Misuse("tfopt.summary of a file that is not a .keras file",
           lambda: _summary_of_path("notes.keras", make=_write_text), raises=ValueError,
           match=r"`tfopt.summary`: model='.*notes.keras' is not a `.keras` file \(the zip archive.*Fix: pass"),
    Misuse("tfopt.summary of a .keras file holding a Lambda layer",
           lambda: _summary_of_path("lam.keras", make=_save_lambda_model),
           raises=ValueError,
           match=r"`tfopt.summary`: model='.*lam.keras' holds Python code \(a Lambda layer\).*safe_mode=False\. "
                 r"Fix: if you trust the file, model = tfopt.load_model\(path, safe_mode=False\)"),
]



def _gpt2():
    """A 2-block GPT-2 causal LM built from its config (nothing downloaded)."""
    import keras_hub  # optional: these rows run only where keras-hub is installed

    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=8)
    return keras_hub.models.GPT2CausalLM(backbone)


def _bert_classifier():
    import keras_hub  # optional: these rows run only where keras-hub is installed

    backbone = keras_hub.models.BertBackbone(vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8,
                                             intermediate_dim=16, max_sequence_length=8)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


_TOKENS = np.ones((2, 8), "int32")

if importlib.util.find_spec("keras_hub") is not None:
    TABLE += [
        Misuse("shrink of a keras-hub model by depth without data",
               lambda: tfopt.shrink(_gpt2(), depth=1), raises=ValueError,
               match=r"`tfopt.shrink\(depth=1\)` of model 'gpt2_causal_lm\w*' \(GPT2CausalLM\) scores blocks by how "
                     r"much they change the hidden state on calibration tokens .* Received: data=None\. Fix: pass"),
        Misuse("shrink of a keras-hub model by more blocks than it has",
               lambda: tfopt.shrink(_gpt2(), depth=2, data=_TOKENS), raises=ValueError,
               match=r"`tfopt.shrink\(depth=...\)` is how many of the model's 2 blocks to remove: an int from 0 to 1, "
                     r"or a share in \[0, 1\)\. Received: depth=2\. Fix"),
        Misuse("shrink of a keras-hub model with nothing to remove",
               lambda: tfopt.shrink(_gpt2()), raises=ValueError,
               match=r"`tfopt.shrink` of keras-hub model 'gpt2_causal_lm\w*' \(GPT2CausalLM\) needs what to remove: "
                     r"fraction=.*Received: none of them, and no feed-forward unit or head group is zero in every block\. Fix"),
        Misuse("shrink of a keras-hub model by heads its config cannot hold fewer of",
               lambda: tfopt.shrink(_gpt2(), heads=1), raises=ValueError,
               match=r"`tfopt.shrink\(heads=1\)`: GPT2Backbone derives the head size as hidden_dim // num_heads, so "
                     r"fewer heads of the same size cannot be written in its config .*Fix: leave heads=None"),
        Misuse("shrink of a keras-hub model with calibration data that is not token ids",
               lambda: tfopt.shrink(_gpt2(), depth=1, data=np.array([["a b"], ["c d"]])), raises=ValueError,
               match=r"`tfopt.shrink`: `data` item 0 for model 'gpt2_causal_lm\w*' \(GPT2CausalLM\) is not token ids "
                     r"\(ints of shape \(batch, sequence\)\)\. Received: an array of dtype <U3 and shape \(2, 1\)\. "
                     r"Fix: tokenize first"),
        Misuse("shrink of a keras-hub model with token ids outside its vocabulary",
               lambda: tfopt.shrink(_gpt2(), depth=1, data=_TOKENS * 64), raises=ValueError,
               match=r"`tfopt.shrink`: `data` item 0 for model 'gpt2_causal_lm\w*' \(GPT2CausalLM\) holds token ids from "
                     r"64 to 64, and its vocabulary has 64 \(ids 0 to 63\)\. Fix"),
        Misuse("shrink of a keras-hub task other than a Backbone or CausalLM",
               lambda: tfopt.shrink(_bert_classifier(), 0.5), raises=TypeError,
               match=r"`tfopt.shrink` takes a keras-hub Backbone or CausalLM, and model '.*' \(BertTextClassifier\) "
                     r"is another keras-hub task.*Fix: shrink its backbone"),
        Misuse("shrink of a keras-hub Llama by hidden width",
               lambda: tfopt.shrink(importlib.import_module("keras_hub").models.LlamaBackbone(
                   vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=8,
                   intermediate_dim=16), hidden=0.25), raises=ValueError,
               match=r"`tfopt.shrink\(hidden=0.25\)`: LlamaBackbone derives the head size as hidden_dim // "
                     r"num_query_heads and has no head_dim in its config.*rotary position embedding.*Fix: leave "
                     r"hidden=None"),
        Misuse("shrink of a keras-hub GPT-2 by a hidden width its heads cannot share",
               lambda: tfopt.shrink(_gpt2(), hidden=3), raises=ValueError,
               match=r"`tfopt.shrink\(hidden=3\)`: model 'gpt2_causal_lm\w*' \(GPT2CausalLM\) derives its head size "
                     r"as hidden_dim // num_heads \(8 // 2\).*a multiple of 2 below 8\. Received: hidden=3\. Fix"),
        Misuse("shrink of a keras-hub model by all its hidden width",
               lambda: tfopt.shrink(_gpt2(), hidden=8), raises=ValueError,
               match=r"`tfopt.shrink\(hidden=...\)` is how many of the model's 8 residual-stream channels "
                     r"\(hidden_dim\) to remove: an int from 0 to 7, or a share in \[0, 1\)\. Received: hidden=8\. Fix"),
        Misuse("shrink of a keras-hub model with an argument for plain Keras models",
               lambda: tfopt.shrink(_gpt2(), 0.5, importance="taylor"), raises=ValueError,
               match=r"`tfopt.shrink\(importance=...\)` applies to plain Keras models, not to keras-hub model "
                     r"'gpt2_causal_lm\w*' \(GPT2CausalLM\).*Received: importance='taylor'\. Fix: leave importance"),
    ]

TABLE += [
    Misuse("shrink by depth of a plain Keras model",
           lambda: tfopt.shrink(_mlp(), depth=1), raises=ValueError,
           match=r"`tfopt.shrink\(depth=...\)` removes whole transformer blocks or heads of keras-hub models, and "
                 r"model 'mlp' \(Sequential\) is not one\. Received: depth=1\. Fix: leave it None"),
    Misuse("shrink by hidden width of a plain Keras model",
           lambda: tfopt.shrink(_mlp(), hidden=0.25), raises=ValueError,
           match=r"`tfopt.shrink\(hidden=...\)` removes hidden \(residual-stream\) channels of keras-hub models, "
                 r"and model 'mlp' \(Sequential\) is not one\. Received: hidden=0.25\. Fix: leave it None"),
]


class PruningMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))


def _width_prune_bert_classifier():
    """WidthPruning in the `fit` of a keras-hub task whose blocks tfopt does not know how to rebuild."""
    model = _bert_classifier()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = {"token_ids": _TOKENS, "segment_ids": np.zeros_like(_TOKENS), "padding_mask": np.ones_like(_TOKENS)}
    schedule = tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
    model.fit(x, np.zeros(2, "int32"), epochs=1, verbose=0, callbacks=[tfopt.callbacks.WidthPruning(schedule)])


if importlib.util.find_spec("keras_hub") is not None:
    TABLE += [
        Misuse("prune of a keras-hub model",
               lambda: tfopt.prune(_gpt2(), "baseline"), raises=TypeError,
               match=r"`tfopt.prune` rebuilds a Functional graph by swapping its layers for tfopt twins, and model "
                     r"'gpt2_causal_lm\w*' \(GPT2CausalLM\) is a keras-hub model: .*Fix: prune it in place during "
                     r"fit, .*tfopt.callbacks.Pruning\(schedule\)"),
        Misuse("width pruning of a keras-hub task whose blocks tfopt cannot rebuild",
               _width_prune_bert_classifier, raises=TypeError,
               match=r"tfopt.callbacks.WidthPruning prunes the feed-forward units .* of keras-hub GPT2, BERT, Llama, "
                     r"Mistral and Gemma backbones and causal LMs, and cannot see inside model '.*' "
                     r"\(BertTextClassifier\): .*Fix: shrink its backbone"),
    ]
