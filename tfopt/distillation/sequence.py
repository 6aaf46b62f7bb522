"""Distillation of sequence models (language models): per-position losses over `(batch, seq, vocab)` outputs.

A causal language model predicts, at every position, a distribution over the
vocabulary. Distilling it compares those distributions position by position
(flattening `(seq, vocab)` into one "class" axis would compare one softmax over
`seq * vocab` values, the wrong objective) and averages over the positions that
count: a position counts with the weight of the padding mask (the
`"padding_mask"` of keras-hub's `{"token_ids", "padding_mask"}` inputs) times
`fit`'s `sample_weight` of shape `(batch, seq)` (or `(batch,)`, per sequence).
The average is over the counted positions of the whole batch (a token-level
mean), so padding holding anything changes nothing.

Labels are the next tokens aligned with the outputs: `y[:, i]` is the token
the model should predict at position `i` (keras-hub's CausalLM preprocessors
give `x = token_ids[:, :-1]`, `y = token_ids[:, 1:]`); -1 marks a position
without a label (it is still distilled).

Cached teacher outputs keep the teacher's top-k logits per position (the full
`(n, seq, vocab)` would not fit in memory). Packed targets have shape
`(n, seq, 2, k + 1)`: per position row 0 is `[label, index_1 .. index_k]`
and row 1 `[weight, logit_1 .. logit_k]` (the indices as float32, exact below
2**24; weight: the padding mask, 1 without one). The distillation over the
top-k support, for `method="kd"`, is `T**2 * sum_i p_t(i) (log p_t(i) -
log p_s(i))` where `p_t` is the teacher's softmax over its top-k logits
(renormalized over the support) and `log p_s` the student's log-softmax over
the whole vocabulary, gathered at those indices. Why renormalized, not "top-k
plus one bucket for the rest": the rest bucket needs the teacher's
normalizer at the training temperature, which caching at one temperature
would fix, while the temperature (or its schedule) is chosen at `compile`.
The renormalized form works for every temperature, pushes the student's mass
into the teacher's support (its probabilities there sum to at most 1, so the
term is >= 0) and equals the full KL when `k` is the vocabulary size; it
ignores the teacher's tail mass, which is small for a trained LM and a modest
temperature. `method="reverse_kl"` renormalizes the student over the support
too (`KL(q_s || p_t)` over the top-k; otherwise the student could lower it by
putting mass outside the support); `"mse"` compares the logits at the support.
"""

import numbers

import keras
import numpy as np
from keras import ops

#: The largest vocabulary whose token indices float32 packing holds exactly.
MAX_PACKED_VOCABULARY = 2**24
_TINY = float(np.finfo(np.float32).tiny)


# --- what a target or an input is --------------------------------------------------
def is_packed(shape):
    """True for `attach_teacher`'s packed sequence targets, shape `(n, seq, 2, k + 1)`."""
    return len(shape) == 4 and shape[2] == 2


def input_mask(x):
    """The `"padding_mask"` of keras-hub style dict inputs as float32 `(batch, seq)`, or None."""
    if isinstance(x, dict) and "padding_mask" in x:
        return ops.cast(x["padding_mask"], "float32")
    return None


def position_weights(batch_seq_shape_like, *weights):
    """The product of the given `(batch, seq)` or `(batch,)` weights (None skipped), as float32
    shaped like `batch_seq_shape_like`'s first two axes."""
    total = ops.ones_like(ops.cast(batch_seq_shape_like, "float32"))
    for weight in weights:
        if weight is None:
            continue
        weight = ops.cast(weight, "float32")
        if len(weight.shape) == 1:
            weight = ops.expand_dims(weight, -1)
        elif len(weight.shape) == 3 and weight.shape[-1] == 1:
            weight = ops.squeeze(weight, -1)
        total = total * weight
    return total


def masked_mean(per_position, weights):
    """`sum(weights * per_position) / sum(weights)` (0 when no position counts)."""
    return ops.divide_no_nan(ops.sum(per_position * weights), ops.sum(weights))


# --- per-position terms -------------------------------------------------------------
def _log_softmax(logits, temperature):
    return ops.log_softmax(ops.cast(logits, "float32") / temperature, axis=-1)


def sequence_term(teacher, student, temperature, method):
    """Per position `(batch, seq)`: the teacher's logits against the student's, over the whole vocabulary.

    `"kd"`: `T**2 * KL(softmax(teacher / T) || softmax(student / T))`;
    `"reverse_kl"`: `T**2 * KL(softmax(student / T) || softmax(teacher / T))`;
    `"mse"`: the mean squared difference of the logits.

    Example:
    >>> import numpy as np
    >>> t = np.zeros((1, 2, 4), "float32")
    >>> tuple(sequence_term(t, t, 2.0, "kd").shape)
    (1, 2)
    """
    if method == "mse":
        return ops.mean(ops.square(ops.cast(teacher, "float32") - ops.cast(student, "float32")), axis=-1)
    log_t, log_s = _log_softmax(teacher, temperature), _log_softmax(student, temperature)
    if method == "reverse_kl":
        return (temperature**2) * ops.sum(ops.exp(log_s) * (log_s - log_t), axis=-1)
    return (temperature**2) * ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)


def top_k_term(values, indices, student, temperature, method):
    """Per position `(batch, seq)`: cached top-k teacher logits (`values`, at `indices` of the
    vocabulary) against the student's logits `(batch, seq, vocab)` (see the module docstring).

    With `k` the vocabulary size it equals `sequence_term` on the full logits.

    Example:
    >>> import numpy as np
    >>> logits = np.array([[[2.0, 0.0, -1.0]]], "float32")
    >>> order = np.array([[[0, 1, 2]]])
    >>> float(top_k_term(logits, order, logits, 1.0, "kd")[0, 0])
    0.0
    """
    indices = ops.cast(indices, "int32")
    if method == "mse":
        picked = ops.take_along_axis(ops.cast(student, "float32"), indices, axis=-1)
        return ops.mean(ops.square(ops.cast(values, "float32") - picked), axis=-1)
    log_t = _log_softmax(values, temperature)  # the teacher renormalized over its top-k
    if method == "reverse_kl":
        picked = ops.take_along_axis(ops.cast(student, "float32"), indices, axis=-1)
        log_q = _log_softmax(picked, temperature)  # the student renormalized over the same support
        return (temperature**2) * ops.sum(ops.exp(log_q) * (log_q - log_t), axis=-1)
    log_s = ops.take_along_axis(_log_softmax(student, temperature), indices, axis=-1)
    return (temperature**2) * ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)


def next_token_loss(labels, logits):
    """Per position: sparse crossentropy of the labels (-1: none, 0 loss) from the logits."""
    labels = ops.cast(labels, "float32")
    loss = keras.losses.sparse_categorical_crossentropy(ops.maximum(labels, 0.0), ops.cast(logits, "float32"),
                                                        from_logits=True)
    return loss * ops.cast(labels >= 0, "float32")


def unpack(y_true):
    """`(labels, weights, values, indices)` from packed targets `(batch, seq, 2, k + 1)`."""
    y = ops.cast(y_true, "float32")
    return y[:, :, 0, 0], y[:, :, 1, 0], y[:, :, 1, 1:], ops.cast(y[:, :, 0, 1:], "int32")


def sequence_loss(y_true, y_pred, temperature, alpha, method, sample_weight=None, mask=None, teacher=None,
                  from_logits=True, who="DistillationLoss"):
    """The scalar loss of a batch: `alpha * next-token crossentropy + (1 - alpha) * distillation`,
    averaged over the positions that count.

    `y_true` is `attach_teacher`'s packed targets (cached top-k teacher) or labels `(batch, seq)`;
    `teacher` the teacher's full logits (online; then `y_true` are labels or None). Plain labels
    without a teacher give the crossentropy alone (`evaluate` on test data). `y_pred` are the
    student's logits (probabilities with `from_logits=False`: their log acts as logits)."""
    check_student(y_pred, who)
    student = ops.cast(y_pred, "float32")
    if not from_logits:
        student = ops.log(ops.clip(student, _TINY, 1.0))
    if y_true is not None and is_packed(tuple(y_true.shape)):
        check_packed(tuple(y_true.shape), tuple(y_pred.shape), who)
        labels, packed_weights, values, indices = unpack(y_true)
        teach = top_k_term(values, indices, student, temperature, method)
        mask = packed_weights if mask is None else mask * packed_weights
    else:
        labels = None
        if y_true is not None:
            check_labels(tuple(y_true.shape), tuple(y_pred.shape), who)
            labels = ops.reshape(y_true, ops.shape(y_true)[:2])
        teach = None if teacher is None else sequence_term(teacher, student, temperature, method)
    weights = position_weights(student[:, :, 0], mask, sample_weight)
    if teach is None:
        return masked_mean(next_token_loss(labels, student), weights)
    if labels is None:
        return masked_mean((1.0 - alpha) * teach, weights)
    return masked_mean(alpha * next_token_loss(labels, student) + (1.0 - alpha) * teach, weights)


# --- checks (static shapes, at construction, attach time or the first trace) -------------------
def check_student(y_pred, who):
    if len(y_pred.shape) != 3:
        raise ValueError(
            f"{who}: the targets are per-position (sequence) targets, so the student's output must be "
            f"(batch, seq, vocab) logits. Received: student output of shape {tuple(y_pred.shape)}. Fix: distill "
            "a language model's logits, or make classification targets with a (batch, classes) teacher."
        )


def check_packed(target_shape, student_shape, who):
    seq, k = target_shape[1], target_shape[3] - 1
    if None not in (seq, student_shape[1]) and seq != student_shape[1]:
        raise _sequence_mismatch(who, f"targets from `attach_teacher` of shape {target_shape}", seq,
                                 student_shape[1])
    vocab = student_shape[2]
    if vocab is not None and k > vocab:
        raise ValueError(
            f"{who}: the targets from `attach_teacher` hold the teacher's top {k} logits per position but the "
            f"student's vocabulary has {vocab} tokens: teacher and student must share one vocabulary. Received: "
            f"targets of shape {target_shape}, student output of shape {student_shape}. Fix: distill from a "
            f"teacher with the student's vocabulary of {vocab} tokens."
        )


def check_labels(label_shape, student_shape, who):
    if len(label_shape) not in (2, 3) or (len(label_shape) == 3 and label_shape[2] != 1):
        raise ValueError(
            f"{who}: the student outputs (batch, seq, vocab) logits {student_shape}, so the labels must be the "
            f"next tokens, shape (batch, seq). Received: y of shape {label_shape}. Fix: pass token ids aligned with "
            "the outputs (x = token_ids[:, :-1], y = token_ids[:, 1:])."
        )
    if None not in (label_shape[1], student_shape[1]) and label_shape[1] != student_shape[1]:
        raise _sequence_mismatch(who, f"labels of shape {label_shape}", label_shape[1], student_shape[1])


def _sequence_mismatch(who, what, seq, student_seq):
    return ValueError(
        f"{who}: the {what} have {seq} positions per sequence but the student outputs {student_seq}: "
        f"distillation compares them position by position. Received: {seq} positions, student sequence length "
        f"{student_seq}. Fix: give the labels one token per output position (x = token_ids[:, :-1], y = "
        "token_ids[:, 1:]), and the student the inputs the teacher saw."
    )


def vocab_mismatch(who, teacher_vocab, student_vocab, where):
    return ValueError(
        f"{who}: the teacher predicts over a vocabulary of {teacher_vocab} tokens ({where}) but the student over "
        f"{student_vocab}: distillation compares them token by token, so both must share one vocabulary (the "
        f"same tokenizer). Received: teacher vocabulary {teacher_vocab}, student vocabulary {student_vocab}. Fix: "
        f"distill from a teacher with the student's tokenizer, or give the student vocabulary_size={teacher_vocab}."
    )


def check_top_k(top_k, who="attach_teacher"):
    if top_k is None:
        return None
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, (bool, np.bool_)) or top_k <= 0:
        raise ValueError(
            f"{who}: `top_k` (the teacher's logits kept per position) must be an integer >= 1. Received: "
            f"top_k={top_k!r}. Fix: pass e.g. top_k=32, or None to keep the whole vocabulary."
        )
    return int(top_k)


def check_top_k_fits(top_k, vocab, teacher_name, who="attach_teacher"):
    if top_k is not None and vocab is not None and top_k > vocab:
        raise ValueError(
            f"{who}: `top_k` is {top_k} but the teacher{teacher_name} predicts over a vocabulary of {vocab} "
            f"tokens, so at most {vocab} logits per position exist. Received: top_k={top_k}. Fix: pass "
            f"top_k <= {vocab} (top_k={vocab} keeps them all: the exact KL)."
        )
    if vocab is not None and vocab > MAX_PACKED_VOCABULARY:
        raise ValueError(
            f"{who}: the teacher's vocabulary has {vocab} tokens; packed targets store token indices as float32, "
            f"exact up to {MAX_PACKED_VOCABULARY}. Received: vocabulary {vocab}. Fix: distill online with "
            "`Distiller`."
        )


# --- packing (numpy, in attach_teacher) ---------------------------------------------
def top_k_numpy(logits, k):
    """`(values, indices)` of the `k` largest logits along the last axis, largest first."""
    logits = np.asarray(logits, "float32")
    if k >= logits.shape[-1]:
        indices = np.argsort(-logits, axis=-1, kind="stable")
    else:
        part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
        indices = np.take_along_axis(part, order, axis=-1)
    return np.take_along_axis(logits, indices, axis=-1), indices


def pack(labels, weights, values, indices):
    """`(n, seq, 2, k + 1)` float32: `[label, indices]` over `[weight, values]` per position."""
    first = np.concatenate([labels[..., None].astype("float32"), indices.astype("float32")], axis=-1)
    second = np.concatenate([weights[..., None].astype("float32"), values.astype("float32")], axis=-1)
    return np.stack([first, second], axis=2)
