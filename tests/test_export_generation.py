"""export_generator(): a keras-hub causal LM as one LiteRT file with prefill/decode signatures and a
key-value cache, whose greedy tokens in the interpreter are Keras's."""

import os
import tempfile
from unittest import mock

import keras
import numpy as np
import pytest

import tfopt
from tfopt import _keras_internal, litert, testing
from tfopt._export import generation, weight_only

keras_hub = pytest.importorskip("keras_hub")

MAX_LENGTH = 16
PROMPTS = ([5, 9, 3, 7], [1], [60, 2, 33, 33, 8, 41, 12, 0, 19])


def _lm():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=32)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _keras_greedy(lm, prompt, max_length=MAX_LENGTH):
    """Keras's own greedy generation (`lm.generate`, GreedySampler) of the prompt padded to max_length."""
    token_ids = np.zeros((1, max_length), "int32")
    token_ids[0, :len(prompt)] = prompt
    padding_mask = np.zeros((1, max_length), bool)
    padding_mask[0, :len(prompt)] = True
    out = lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    return np.asarray(out["token_ids"])[0]


def _path(name="lm.tflite"):
    return os.path.join(tempfile.mkdtemp(), name)


class GeneratorFloatTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.lm = _lm()
        cls.lm.compile(sampler=keras_hub.samplers.GreedySampler())
        cls.report = tfopt.export_generator(cls.lm, _path(), max_length=MAX_LENGTH, prompt_length=12)
        with open(cls.report.path, "rb") as f:
            cls.content = f.read()

    def test_greedy_tokens_are_keras_tokens(self):
        generator = litert.Generator(self.report.path)
        for prompt in PROMPTS:
            expected = _keras_greedy(self.lm, prompt)
            got = generator.generate(prompt, MAX_LENGTH - len(prompt))
            self.assertEqual(got.tolist(), expected.tolist(), f"prompt {prompt}")
            self.assertEqual(generator.stats.new_tokens, MAX_LENGTH - len(prompt))
            self.assertGreater(generator.stats.decode_tokens_per_second, 0)

    def test_report_and_signatures(self):
        report = self.report
        self.assertEqual(report.size_bytes, len(self.content))
        self.assertEqual(report.signatures["prefill"], {"inputs": ["length", "token_ids"],
                                                        "outputs": ["cache", "logits"]})
        self.assertEqual(report.signatures["decode"], {"inputs": ["cache", "position", "token_id"],
                                                       "outputs": ["cache", "logits"]})
        self.assertEqual(report.cache_shape, (1, 2, 2, MAX_LENGTH, 2, 16))
        self.assertEqual((report.max_length, report.prompt_length), (MAX_LENGTH, 12))
        self.assertEqual(report.token_agreement, 1.0)
        self.assertLess(report.max_abs_diff, 1e-4)
        self.assertIn("signatures ['decode', 'prefill']", str(report))

    def test_default_interpreter_loads_it_without_select_ops(self):
        self.assertIsNone(litert.litert_load_error(self.content))
        interpreter = litert._interpreter(model_content=self.content)
        names = {op["op_name"] for op in _keras_internal.litert_ops(interpreter)}
        self.assertFalse([n for n in names if n.startswith("Flex") or n == "CUSTOM"], names)

    def test_padding_does_not_change_the_prompt_logits(self):
        generator = litert.Generator(self.content)
        first = generator.generate([5, 9, 3], 1, return_logits=True)[1]
        # The same prompt with other tokens in the padded positions: prefill's output is the same.
        padded = np.full((1, generator.prompt_length), 63, "int32")
        padded[0, :3] = [5, 9, 3]
        out = generator._prefill(token_ids=padded, length=np.asarray(3, "int32"))
        np.testing.assert_allclose(out["logits"][0], first[0], atol=1e-6)

    def test_stop_token_ends_generation(self):
        generator = litert.Generator(self.content)
        full = generator.generate([5, 9, 3, 7], 8)
        stopped = generator.generate([5, 9, 3, 7], 8, stop_token_ids=[int(full[4])])
        self.assertEqual(stopped.tolist(), full[:5].tolist())  # (the stop token is kept)

    def test_generate_refuses_what_does_not_fit(self):
        generator = litert.Generator(self.content)
        with self.assertRaisesRegex(ValueError, r"prompt_length=12.*Fix: shorten the prompt"):
            generator.generate(list(range(13)), 1)
        with self.assertRaisesRegex(ValueError, r"max_new_tokens=13 is 17 tokens, more than the file's "
                                                r"max_length=16.*Fix: max_new_tokens=12"):
            generator.generate([1, 2, 3, 4], 13)
        with self.assertRaisesRegex(ValueError, r"outside the vocabulary \[0, 64\)"):
            generator.generate([1, 64], 2)
        with self.assertRaisesRegex(ValueError, r"`max_new_tokens` must be a positive int.*0"):
            generator.generate([1, 2], 0)
        with self.assertRaisesRegex(ValueError, r"non-empty 1-D sequence of integer token ids"):
            generator.generate([], 2)

    def test_generator_refuses_a_file_without_the_signatures(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, r"no \['prefill', 'decode'\] signature.*tfopt.export_generator"):
            litert.Generator(litert.convert(model))


class GeneratorWeightOnlyTest(testing.TestCase):
    def test_int8_weight_only_agrees_with_keras(self):
        pytest.importorskip("litert_quantizer")
        lm = _lm()
        lm.compile(sampler=keras_hub.samplers.GreedySampler())
        report = tfopt.export_generator(lm, _path(), max_length=MAX_LENGTH, precision="int8_weight_only")
        with open(report.path, "rb") as f:
            content = f.read()
        self.assertEqual(sorted(report.signatures), ["decode", "prefill"])
        self.assertTrue(weight_only.tensor_types(content).get(weight_only.INT8))
        self.assertLess(report.size_bytes, report.float_size_bytes)
        generator = litert.Generator(content)
        same = total = 0
        for prompt in PROMPTS:
            expected = _keras_greedy(lm, prompt)[len(prompt):]
            got = generator.generate(prompt, MAX_LENGTH - len(prompt))[len(prompt):]
            # Tokens after the first difference follow another sequence: count the common prefix.
            differs = np.flatnonzero(got != expected)
            same += differs[0] if differs.size else len(got)
            total += len(got)
        print(f"int8_weight_only: greedy tokens identical to Keras's for {same}/{total} tokens "
              f"(common prefixes), check agreement {report.token_agreement:.0%}")
        self.assertGreaterEqual(report.token_agreement, 0.75)
        self.assertGreaterEqual(same / total, 0.5)


class OtherCausalLMsTest(testing.TestCase):
    def test_llama_mistral_gemma_generate_keras_tokens(self):
        # Grouped-query attention (Llama, Mistral) and one key-value head (Gemma): the same code serves.
        # The export's check runs 8 greedy steps in the file against the Keras logits on the same sequence.
        config = dict(vocabulary_size=64, num_layers=1, num_query_heads=4, hidden_dim=32, intermediate_dim=64)
        models = {
            "Llama": lambda: keras_hub.models.LlamaCausalLM(
                keras_hub.models.LlamaBackbone(num_key_value_heads=2, **config), preprocessor=None),
            "Mistral": lambda: keras_hub.models.MistralCausalLM(
                keras_hub.models.MistralBackbone(num_key_value_heads=2, sliding_window=None, **config),
                preprocessor=None),
            "Gemma": lambda: keras_hub.models.GemmaCausalLM(
                keras_hub.models.GemmaBackbone(num_key_value_heads=1, head_dim=8, **config), preprocessor=None),
        }
        for name, build in models.items():
            keras.utils.set_random_seed(0)
            report = tfopt.export_generator(build(), _path(), max_length=12, prompt_length=6)
            self.assertEqual(report.token_agreement, 1.0, name)
            self.assertLess(report.max_abs_diff, 1e-4, name)


class GeneratorWriteTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.lm = _lm()

    def test_a_failure_leaves_the_previous_file(self):
        path = _path()
        tfopt.export_generator(self.lm, path, max_length=8, check=False)
        with open(path, "rb") as f:
            good = f.read()
        error = RuntimeError("tflite/kernels/gather.cc: index out of bounds")
        with mock.patch.object(generation, "_load_error", return_value=error):
            with self.assertRaisesRegex(ValueError, r"does not run in the default LiteRT interpreter.*nothing was "
                                                    r"written"):
                tfopt.export_generator(self.lm, path, max_length=8, precision="float16", check=False)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), good)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["lm.tflite"])  # (no temporary file left)
        report = tfopt.export_generator(self.lm, path, max_length=8, precision="float16", check=False)
        self.assertLess(report.size_bytes, len(good))
        self.assertIsNone(report.token_agreement)
        with open(path, "rb") as f:
            self.assertEqual(len(f.read()), report.size_bytes)

    def test_misuse_is_refused_before_converting(self):
        with mock.patch.object(generation, "_convert", side_effect=AssertionError("converted")):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            with self.assertRaisesRegex(TypeError, r"`causal_lm` must be a keras-hub CausalLM.*Received: causal_lm "
                                                   r"of type Sequential.*Fix:.*tfopt.export"):
                tfopt.export_generator(model, _path())
            with self.assertRaisesRegex(ValueError, r"`max_length`.*from 2 to the backbone's max_sequence_length "
                                                    r"32. Received: max_length=64. Fix: pass max_length=32"):
                tfopt.export_generator(self.lm, _path(), max_length=64)
            with self.assertRaisesRegex(ValueError, r"`max_length`.*Received: max_length=1\."):
                tfopt.export_generator(self.lm, _path(), max_length=1)
            with self.assertRaisesRegex(ValueError, r"`prompt_length`.*1 to max_length=16. Received: "
                                                    r"prompt_length=17"):
                tfopt.export_generator(self.lm, _path(), max_length=16, prompt_length=17)
            with self.assertRaisesRegex(ValueError, r"`precision` must be one of .*'int4_block32'.*Received: "
                                                    r"precision='int8'. Fix:"):
                tfopt.export_generator(self.lm, _path(), max_length=16, precision="int8")
            with self.assertRaisesRegex(ValueError, r"should end in '.tflite'. Received: path='lm.bin'"):
                tfopt.export_generator(self.lm, "lm.bin", max_length=16)
            directory = os.path.join(tempfile.mkdtemp(), "d.tflite")
            os.makedirs(directory)
            with self.assertRaisesRegex(IsADirectoryError, r"is a directory"):
                tfopt.export_generator(self.lm, directory, max_length=16)
