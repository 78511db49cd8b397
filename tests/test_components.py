"""Transform preprocessing, augmentation, model and training config, without running TFX."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import TrainerConfig
from conftest import REPO
from data import contract


@pytest.fixture(scope="module")
def digit_pngs(sample_tree) -> list[bytes]:
    return [p.read_bytes() for p in sorted((sample_tree / "training" / "7").iterdir())[:6]]


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_preprocessing_gives_75x75x3_float_in_minus_one_to_one(digit_pngs):
    import tensorflow as tf

    from components.transform import preprocess

    images = preprocess(tf.constant(digit_pngs)).numpy()
    assert images.shape == (6, 75, 75, 3) and images.dtype == np.float32
    assert images.min() == pytest.approx(-1.0) and 0.9 < images.max() <= 1.0
    # gray in, three identical channels out
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_preprocessing_accepts_jpeg_colour_and_any_size_like_serving_must(digit_pngs):
    import tensorflow as tf

    from components.transform import preprocess

    with Image.open(io.BytesIO(digit_pngs[0])) as image:
        gray = np.asarray(image)
    rgb_big = np.asarray(Image.fromarray(gray).convert("RGB").resize((140, 100)))
    batch = [digit_pngs[0], _encode(gray, "JPEG"), _encode(rgb_big, "PNG")]
    images = preprocess(tf.constant(batch)).numpy()
    assert images.shape == (3, 75, 75, 3)
    assert np.abs(images[0] - images[1]).mean() < 0.05  # JPEG of the same digit: nearly the same input


def test_bytes_that_are_not_an_image_are_invalid_argument():
    import tensorflow as tf

    from components.transform import preprocess

    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess(tf.constant([b"definitely not a PNG"]))


def test_augmentation_moves_pixels_keeps_shape_range_and_never_mirrors(digit_pngs):
    import tensorflow as tf

    from components.augment import augment_batch
    from components.transform import preprocess

    images = preprocess(tf.constant(digit_pngs))
    tf.random.set_seed(1)
    augmented = augment_batch(images, max_translation=5, max_rotation_degrees=10).numpy()
    original = images.numpy()
    assert augmented.shape == original.shape
    assert augmented.min() >= -1.0 - 1e-6 and augmented.max() <= 1.0 + 1e-6
    assert np.abs(augmented - original).mean() > 0.01  # it did something
    # Still closer to the digit itself than to its mirror image: shifts and small rotations only.
    mirrored = original[:, :, ::-1, :]
    for aug, orig, mirror in zip(augmented, original, mirrored):
        best_shift = min(
            np.abs(np.roll(np.roll(orig, dy, 0), dx, 1) - aug).mean() for dy in range(-5, 6) for dx in range(-5, 6)
        )
        assert best_shift < np.abs(mirror - aug).mean()
    # Off switches really switch off.
    np.testing.assert_array_equal(augment_batch(images, 0, 0).numpy(), original)
    np.testing.assert_array_equal(augment_batch(images, 0, 0, 0.0).numpy(), original)


def test_scale_augmentation_enlarges_and_shrinks_the_digit_about_the_centre(digit_pngs):
    import tensorflow as tf

    from components.augment import augment_batch
    from components.transform import preprocess

    images = preprocess(tf.constant(digit_pngs * 8))  # 48 images: both directions get drawn
    tf.random.set_seed(3)
    scaled = augment_batch(images, max_translation=0, max_rotation_degrees=0, max_scale_change=0.2).numpy()
    original = images.numpy()

    def ink(batch):
        return batch[..., 0] > 0.0  # ink is light: above the middle of [-1, 1]

    def extent(mask):  # the ink's bounding-box height and width, in pixels
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1

    ratios = []
    for before, after in zip(ink(original), ink(scaled)):
        (h0, w0), (h1, w1) = extent(before), extent(after)
        ratios.append((h1 / h0 + w1 / w0) / 2)
        # About the centre: the ink's centre of mass moves by about scale x its distance from the centre.
        centre = (np.array(before.shape) - 1) / 2
        mass_before = np.argwhere(before).mean(axis=0) - centre
        mass_after = np.argwhere(after).mean(axis=0) - centre
        assert np.abs(mass_after - mass_before).max() < 0.2 * np.abs(mass_before).max() + 1.5
    ratios = np.array(ratios)
    # Between 0.8x and 1.2x (a pixel's rounding either way), and both bigger and smaller digits drawn.
    assert ratios.min() > 0.75 and ratios.max() < 1.25, ratios
    assert (ratios < 0.95).any() and (ratios > 1.05).any(), ratios
    assert scaled.min() >= -1.0 - 1e-6 and scaled.max() <= 1.0 + 1e-6


def test_stroke_and_blur_augmentation_thicken_thin_and_soften_the_ink(digit_pngs):
    import tensorflow as tf

    from components.augment import augment_ink
    from components.transform import normalize_batch

    normalized, _ = normalize_batch(tf.constant(digit_pngs * 20))  # 120 digits: every choice is drawn
    original = normalized.numpy()
    ink = (original > 0.5).mean(axis=(1, 2))
    tf.random.set_seed(3)
    stroked = augment_ink(normalized, stroke_probability=1.0, blur_probability=0.0).numpy()
    change = (stroked > 0.5).mean(axis=(1, 2)) / ink
    assert (change > 1.15).sum() > 30 and (change < 0.9).sum() > 30  # about half thicker, half thinner
    assert ((change > 0.9) & (change < 1.15)).sum() == 0  # with probability 1, every image changes
    blurred = augment_ink(normalized, stroke_probability=0.0, blur_probability=1.0).numpy()
    # Softer edges: fewer pixels near full ink, the ink's mass stays where it was.
    assert (blurred > 0.9).mean() < 0.8 * (original > 0.9).mean()
    np.testing.assert_allclose(blurred.sum(axis=(1, 2)), original.sum(axis=(1, 2)), rtol=0.02)
    assert blurred.min() >= 0.0 and blurred.max() <= 1.0 + 1e-5 and stroked.max() <= 1.0 + 1e-5
    mixed = augment_ink(normalized, stroke_probability=0.5, blur_probability=0.0).numpy()
    unchanged = np.all(mixed == original, axis=(1, 2)).mean()
    assert 0.3 < unchanged < 0.7
    np.testing.assert_array_equal(augment_ink(normalized, 0.0, 0.0).numpy(), original)  # off really is off


def test_elastic_distortion_bends_each_digit_by_its_own_smooth_field_of_the_stated_size(digit_pngs):
    import tensorflow as tf

    from components.augment import elastic_distortion
    from components.transform import normalize_batch

    # Where each pixel samples from, read off images whose value is their own row (or column) index.
    size = 28
    ramp = np.tile(np.arange(size, dtype=np.float32)[None, :, None], (64, 1, size))
    tf.random.set_seed(5)
    rows = elastic_distortion(tf.constant(ramp), 34.0).numpy() - ramp
    columns = elastic_distortion(tf.constant(ramp.transpose(0, 2, 1)), 34.0).numpy() - ramp.transpose(0, 2, 1)
    for moved in (rows[:, 6:22, 6:22], columns[:, 6:22, 6:22]):  # inside, where the zero border does not reach
        assert 1.0 < moved.std() < 1.8, moved.std()  # about 1.4 pixels, as the docs say of alpha 34
        # Smooth, not per-pixel noise: neighbours move together.
        assert np.corrcoef(moved[:, :, :-1].ravel(), moved[:, :, 1:].ravel())[0, 1] > 0.95
        assert np.corrcoef(moved[:, :-1, :].ravel(), moved[:, 1:, :].ravel())[0, 1] > 0.95
    # Each image its own field, not one field for the batch.
    assert np.abs(rows[0] - rows[1]).mean() > 0.5

    normalized, _ = normalize_batch(tf.constant(digit_pngs * 4))
    original = normalized.numpy()
    bent = elastic_distortion(normalized, 34.0).numpy()
    assert bent.shape == original.shape and bent.min() >= 0.0 and bent.max() <= 1.0 + 1e-5
    assert np.all(np.abs(bent - original).mean(axis=(1, 2)) > 0.01)  # every digit changed...
    # ...its ink stretched here and squeezed there (a field this size moves neighbours apart by up to a third),
    # with no bias either way over the batch.
    ink = bent.sum(axis=(1, 2)) / original.sum(axis=(1, 2))
    assert 0.4 < ink.min() and ink.max() < 1.8 and 0.9 < ink.mean() < 1.1, ink
    np.testing.assert_array_equal(elastic_distortion(normalized, 0.0).numpy(), original)  # off really is off


def test_model_head_has_the_designed_layers_and_outputs_probabilities():
    import tensorflow as tf

    from components.model import build_model

    model = build_model(TrainerConfig(dense_units=(128, 64), dropout=(0.3, 0.2)), base_weights=None)
    head = [(layer.name, type(layer).__name__) for layer in model.layers[2:]]
    assert head == [("dense_1", "Dense"), ("dropout_1", "Dropout"), ("dense_2", "Dense"), ("dropout_2", "Dropout"),
                    ("probabilities", "Dense")]
    assert [model.get_layer(f"dense_{i}").units for i in (1, 2)] == [128, 64]
    assert [model.get_layer(f"dropout_{i}").rate for i in (1, 2)] == [0.3, 0.2]
    base = model.get_layer("inception_v3")
    assert base.input_shape == (None, 75, 75, 3)
    momenta = {layer.momentum for layer in base.layers if type(layer).__name__ == "BatchNormalization"}
    assert momenta == {TrainerConfig().batchnorm_momentum}
    assert type(model.optimizer).__name__ == "Adam"
    probabilities = model(tf.zeros([2, 75, 75, 3]), training=False).numpy()
    assert probabilities.shape == (2, contract.NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_learning_rate_warms_up_then_decays_to_zero_by_the_last_step():
    from components.model import learning_rate

    schedule = learning_rate(TrainerConfig(epochs=10, learning_rate=1e-3, warmup_epochs=1), steps_per_epoch=50)
    rates = [float(schedule(step)) for step in (0, 25, 50, 275, 499, 500)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(5.5e-4)  # linear warm-up from 0.1x
    assert rates[2] == pytest.approx(1e-3)  # the peak after one epoch
    assert rates[3] == pytest.approx(5e-4, rel=0.01)  # half-way through the decay
    assert rates[4] < 1e-7 and rates[5] == 0.0
    constant = TrainerConfig(lr_schedule="constant", learning_rate=1e-4, optimizer="rmsprop")
    assert learning_rate(constant, steps_per_epoch=50) == 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": -1}, "epochs must be at least 1"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"learning_rate": 0}, "learning rate must be positive"),
        ({"optimizer": "adagrad"}, "optimizer must be one of"),
        ({"dense_units": (32, 64)}, "dense units"),
        ({"dropout": (0.1, 0.2)}, "dropout"),
        ({"base_weights": "/no/such/weights.h5"}, "no file at '/no/such/weights.h5'"),
        ({"batch_size": 0}, "batch size"),
        ({"batchnorm_momentum": 1.0}, "batchnorm momentum"),
        ({"early_stopping_start_epoch": -1}, "early stopping start epoch"),
        ({"lr_schedule": "step"}, "learning-rate schedule must be one of cosine, constant"),
        ({"warmup_epochs": -1}, "warm-up epochs must be >= 0"),
        ({"precision": "float16"}, "precision must be one of auto, float32, mixed_bfloat16"),
        ({"max_scale_change": -0.1}, r"scale augmentation must be in \[0, 0.5\), got -0.1"),
        ({"max_scale_change": 0.5}, r"scale augmentation must be in \[0, 0.5\), got 0.5"),
        ({"elastic_alpha": -1.0}, r"elastic augmentation must be in \[0, 100\], got -1.0"),
        ({"elastic_alpha": 150.0}, r"elastic augmentation must be in \[0, 100\], got 150.0"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**kwargs)


def test_config_round_trips_through_custom_config_and_refuses_unknown_keys():
    config = TrainerConfig(epochs=3, dense_units=(96, 64))
    assert TrainerConfig.from_custom_config(config.to_custom_config()) == config
    with pytest.raises(ValueError, match="unknown training options in custom_config: epoch"):
        TrainerConfig.from_custom_config({"epoch": 3})


def test_auto_base_weights_fall_back_to_random_init_loudly_without_network(tmp_path, monkeypatch):
    from components import base_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    resolved = base_weights.resolve("auto")
    assert resolved.keras_weights is None and not resolved.pretrained
    assert "RANDOM initialisation" in resolved.warning
    cached = tmp_path / "models" / base_weights.IMAGENET_NOTOP_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"h5")
    resolved = base_weights.resolve("auto")
    assert resolved.keras_weights == str(cached) and resolved.pretrained and resolved.warning is None
    with pytest.raises(ValueError, match="does not exist"):
        base_weights.resolve(str(tmp_path / "missing.h5"))


def test_base_weights_are_pinned_before_the_pipeline_is_built(tmp_path, monkeypatch):
    """`auto` must not reach the Trainer's cache key: once ImageNet weights land in the Keras cache,
    the Trainer's configuration (and so TFX's cache key) changes, and with it any change of the file."""
    from components import base_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    random_init = base_weights.pin(TrainerConfig())
    assert (random_init.base_weights, random_init.base_weights_sha256) == ("none", "")
    assert "RANDOM initialisation" in random_init.base_weights_warning

    cached = tmp_path / "models" / base_weights.IMAGENET_NOTOP_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights, version 1")
    imagenet = base_weights.pin(TrainerConfig())
    assert imagenet.base_weights == str(cached) and imagenet.base_weights_warning == ""
    assert imagenet.base_weights_sha256 == hashlib.sha256(b"weights, version 1").hexdigest()
    assert imagenet.to_custom_config() != random_init.to_custom_config()
    assert base_weights.pin(imagenet) == imagenet  # pinning is idempotent
    assert base_weights.resolve_pinned(imagenet).keras_weights == str(cached)

    cached.write_bytes(b"weights, version 2")
    assert base_weights.pin(TrainerConfig()).to_custom_config() != imagenet.to_custom_config()
    with pytest.raises(ValueError, match="changed since the pipeline was built"):
        base_weights.resolve_pinned(imagenet)


def test_a_weights_hash_needs_a_weights_file():
    with pytest.raises(ValueError, match="a base weights hash needs a weights file"):
        TrainerConfig(base_weights="auto", base_weights_sha256="ab" * 32)


@pytest.fixture(scope="module")
def own_weights_file(tmp_path_factory):
    """An InceptionV3 notop weights file made here (random, but not Keras' default init): no download."""
    import tf_keras as keras

    shape = (contract.IMAGE_SIZE, contract.IMAGE_SIZE, contract.IMAGE_CHANNELS)
    keras.utils.set_random_seed(7)
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape, pooling="avg")
    path = tmp_path_factory.mktemp("weights") / "inception_v3_notop.h5"
    base.save_weights(str(path))
    return path, [weight.copy() for weight in base.get_weights()]


def _tiny_data(batches: int = 2, size: int = 8):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batches * size, contract.IMAGE_SIZE, contract.IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, contract.NUM_CLASSES, batches * size)
    from components.transform import IMAGE_XF

    return tf.data.Dataset.from_tensor_slices(({IMAGE_XF: images}, labels)).batch(size)


def test_transfer_learning_freezes_the_pretrained_base_then_fine_tunes_it(own_weights_file):
    """The frozen phase leaves every base weight (BatchNorm statistics included) as the file has it."""
    import tf_keras as keras

    from components.model import BASE_NAME, build_model, fit

    path, file_weights = own_weights_file
    data = _tiny_data()
    config = TrainerConfig(epochs=2, frozen_epochs=1, base_weights=str(path), fine_tune_learning_rate=1e-3)
    model = build_model(config, str(path), steps_per_epoch=2, pretrained=True)
    base = model.get_layer(BASE_NAME)
    for loaded, wanted in zip(base.get_weights(), file_weights):
        np.testing.assert_array_equal(loaded, wanted)  # the file really was loaded
    head_before = model.get_layer("probabilities").get_weights()[0].copy()
    phases = []  # per phase: (base trainable during it, base weights and head kernel at its end)

    class Snapshot(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.trainable = base.trainable

        def on_train_end(self, logs=None):
            phases.append((self.trainable, [w.numpy().copy() for w in base.weights],
                           model.get_layer("probabilities").get_weights()[0].copy()))

    history = fit(model, data, data, config, steps_per_epoch=2, pretrained=True, callbacks=lambda: [Snapshot()])
    assert len(history["loss"]) == len(history["val_loss"]) == 2
    assert [trainable for trainable, _, _ in phases] == [False, True] and base.trainable

    _, frozen_base, frozen_head = phases[0]
    for after, wanted in zip(frozen_base, file_weights):
        np.testing.assert_array_equal(after, wanted)
    assert not np.array_equal(frozen_head, head_before)  # the head learned meanwhile

    # Fine-tuning: the base's kernels move, its BatchNorm statistics (inference mode) do not.
    _, tuned_base, _ = phases[1]
    names = [w.name for w in base.weights]
    kernels_moved = [not np.array_equal(after, wanted)
                     for name, after, wanted in zip(names, tuned_base, file_weights) if "kernel" in name]
    assert kernels_moved and all(kernels_moved)
    statistics = [np.array_equal(after, wanted)
                  for name, after, wanted in zip(names, tuned_base, file_weights) if "moving_" in name]
    assert statistics and all(statistics)


def test_from_random_weights_there_is_one_phase_and_everything_trains():
    from components.model import BASE_NAME, build_model, fit

    config = TrainerConfig(epochs=1, frozen_epochs=3, base_weights="none")
    model = build_model(config, None, steps_per_epoch=2)
    before = [w.numpy().copy() for w in model.get_layer(BASE_NAME).weights]
    history = fit(model, _tiny_data(), _tiny_data(), config, steps_per_epoch=2, pretrained=False)
    assert len(history["loss"]) == 1
    moved = [not np.array_equal(w.numpy(), b) for w, b in zip(model.get_layer(BASE_NAME).weights, before)]
    assert all(moved)  # kernels, BatchNorm scales and moving statistics alike


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_bfloat16_instructions(tmp_path):
    from components import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    flags = precision.cpu_flags(cpuinfo)
    assert "avx512_bf16" in flags and "avx2" in flags
    assert precision.resolve("auto", flags) == "mixed_bfloat16"
    assert precision.resolve("auto", {"amx_bf16"}, gpus=0) == "mixed_bfloat16"
    assert precision.resolve("auto", {"amx_bf16"}, gpus=1) == "float32"  # on a GPU: no faster at 75x75
    assert precision.resolve("mixed_float16", set(), gpus=2) == "mixed_float16"
    with pytest.raises(ValueError, match="mixed_float16 needs a GPU"):
        precision.resolve("mixed_float16", {"amx_bf16"}, gpus=0)
    assert precision.resolve("auto", {"avx2", "avx512f"}) == "float32"  # emulated bfloat16 is slower
    assert precision.resolve("auto", precision.cpu_flags(tmp_path / "missing")) == "float32"
    assert precision.resolve("float32", {"avx512_bf16"}) == "float32"  # an explicit choice stands
    pinned = precision.pin(TrainerConfig(precision="auto"))
    assert pinned.precision == precision.resolve("auto")  # decided before the pipeline: in the cache key
    assert precision.pin(pinned) == pinned
    assert precision.pin(TrainerConfig()).precision == "float32"  # the default


MIRRORED_PROBE = """
import json, os
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
[cpu] = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras as keras
from components import distribute
from components.config import TrainerConfig
from components.model import BASE_NAME, build_model, fit
from test_components import _tiny_data


def small_base(include_top, weights, input_shape, pooling):  # InceptionV3's place, with a BatchNorm too
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(8, 3, strides=4)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=BASE_NAME)


keras.applications.InceptionV3 = small_base

devices = [device.name for device in tf.config.list_logical_devices("CPU")]
strategy = distribute.strategy(devices)
config = TrainerConfig(epochs=1, base_weights="none", frozen_epochs=0)
with strategy.scope():
    model = build_model(config, None, steps_per_epoch=1)
    kernel = model.get_layer(BASE_NAME).weights[0]
    before = kernel.numpy().copy()
    history = fit(model, _tiny_data(1, 4), _tiny_data(1, 4), config, steps_per_epoch=1, pretrained=False)
replicas = [value.numpy() for value in kernel.values]
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "devices": sorted(v.device for v in kernel.values),
                  "kind": type(strategy).__name__, "loss": history["loss"],
                  "moved": bool(not np.array_equal(replicas[0], before)),
                  "in_step": bool(all(np.array_equal(replicas[0], other) for other in replicas[1:])),
                  "one_device": type(distribute.strategy(devices[:1])).__name__}))
"""


def test_several_devices_train_one_mirrored_model_in_step():
    """MirroredStrategy over two devices (two logical CPUs here, GPUs in the cloud): the model is built,
    compiled and trained in its scope through the Trainer's own build_model and fit, every
    variable has a copy on each device, and the copies move together; one device gets the default strategy.
    A small base with a BatchNorm stands in for InceptionV3, whose ~300 layers take 90 s to trace for two
    replicas on these cores: what is tested is the scope and the mirroring, not the architecture."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)])}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", MIRRORED_PROBE], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["kind"], found["replicas"]) == ("MirroredStrategy", 2)
    assert [device.rsplit("/", 1)[-1] for device in found["devices"]] == ["device:CPU:0", "device:CPU:1"]
    assert len(found["loss"]) == 1 and all(np.isfinite(found["loss"]))
    assert found["moved"] and found["in_step"]
    assert found["one_device"] == "_DefaultDistributionStrategy"


def test_bfloat16_training_exports_the_same_weights_as_a_float32_model():
    """Mixed precision computes in bfloat16 with float32 weights; what is exported is a float32 model
    with those very weights, so serving never sees bfloat16."""
    import tensorflow as tf
    import tf_keras as keras

    from components.model import BASE_NAME, build_model, fit, float32_copy

    config = TrainerConfig(epochs=1, base_weights="none", precision="mixed_bfloat16")
    model = build_model(config, None, steps_per_epoch=2)
    assert keras.mixed_precision.global_policy().name == "float32"  # put back after building
    assert model.get_layer(BASE_NAME).layers[1].compute_dtype == "bfloat16"
    assert {w.dtype for w in model.weights} == {tf.float32}
    assert model.get_layer("probabilities").compute_dtype == "float32"
    fit(model, _tiny_data(), _tiny_data(), config, steps_per_epoch=2, pretrained=False)

    exported = float32_copy(model, config)
    assert exported is not model
    assert {layer.compute_dtype for layer in exported.get_layer(BASE_NAME).layers} == {"float32"}
    for mine, theirs in zip(exported.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    images = tf.random.uniform([4, 75, 75, 3], -1.0, 1.0, seed=1)
    probabilities = exported(images, training=False)
    assert probabilities.dtype == tf.float32
    # The same model, only computed more precisely: close to what bfloat16 answered.
    np.testing.assert_allclose(probabilities.numpy(), model(images, training=False).numpy(), atol=0.05)

    plain = build_model(TrainerConfig(base_weights="none", precision="float32"), None)
    assert float32_copy(plain, config) is plain
