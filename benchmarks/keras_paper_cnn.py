"""Keras (TensorFlow) training speed of the paper's CNN; run by bench_train_speed.py in its own interpreter so that
TensorFlow never shares a process (or an environment) with torch.

    python benchmarks/keras_paper_cnn.py IMAGES.npz STEPS THREADS   -> prints images/s on the last line
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(images_path: str, steps: int, threads: int) -> None:
    import keras
    import tensorflow as tf

    # same thread budget as the torch side, or the comparison measures thread counts instead of frameworks
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    data = np.load(images_path)
    x, y = np.ascontiguousarray(data["x"].transpose(0, 2, 3, 1)), data["y"]  # Keras is channels-last (NHWC)
    size, batch = x.shape[1], int(data["batch"])
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((size, size, 1)),
        layers.Conv2D(32, 4, activation="relu"), layers.Conv2D(16, 4, activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(32, 4, activation="relu"), layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(1, activation="sigmoid"),
    ])  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    n = (len(x) // batch) * batch
    model.fit(x[:n], y[:n], batch_size=batch, epochs=1, verbose=0)  # warm-up: graph tracing
    epochs = max(1, steps * batch // n)
    start = time.perf_counter()
    model.fit(x[:n], y[:n], batch_size=batch, epochs=epochs, verbose=0)
    print(f"{epochs * n / (time.perf_counter() - start):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
