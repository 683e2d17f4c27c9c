"""nnU-Net v2's side of benchmarks/bench_nnunet.py, run with the Python that has `nnunetv2` (its own venv: nnU-Net
pins packages medpipe does not). Two commands:

    python benchmarks/nnunet_side.py train DATASET_ID BUDGET_SECONDS [ITERATIONS_PER_EPOCH]
    python benchmarks/nnunet_side.py predict DATASET_ID OUT_DIR CASE [CASE …]

`train`: nnU-Net's own trainer (its plans, network, loss, augmentation, poly schedule) on fold 0 of the
preprocessed folder's splits_final.json, with one change: the number of epochs is set after the first epoch so that
the whole run fits BUDGET_SECONDS (the time medpipe's fold took), and the poly schedule decays over that many epochs.
`predict`: nnU-Net's predictor (nnUNetPredictor, its default mirroring) on the given cases of imagesTr.
The nnUNet_raw / nnUNet_preprocessed / nnUNet_results variables say where the folders are.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: N813

CONFIGURATION, FOLD = "2d", 0


def _dataset_dir(root_variable: str, dataset_id: int) -> Path:
    root = Path(os.environ[root_variable])
    (folder,) = root.glob(f"Dataset{dataset_id:03d}_*")
    return folder


class TimedTrainer(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnUNetTrainer whose epoch count is fitted to a wall-time budget after its first epoch."""

    budget_s: float = 0.0

    def run_training(self) -> None:
        self.on_train_start()
        started = time.perf_counter()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                batches = range(self.num_val_iterations_per_epoch)
                val = [self.validation_step(next(self.dataloader_val)) for _ in batches]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
            if self.current_epoch == 1:  # one epoch measured: as many as fit the budget, the schedule over them
                per_epoch = time.perf_counter() - started
                self.num_epochs = max(2, int(self.budget_s // per_epoch))
                self.lr_scheduler.max_steps = self.num_epochs
                print(f"nnU-Net epoch 1: {per_epoch:.1f} s -> {self.num_epochs} epochs in {self.budget_s:.0f} s",
                      flush=True)
        self.on_train_end()
        print(json.dumps({"nnunet_epochs": self.num_epochs, "nnunet_train_s": round(time.perf_counter() - started, 1),
                          "nnunet_iterations_per_epoch": self.num_iterations_per_epoch,
                          "nnunet_batch_size": self.batch_size}), flush=True)


def train(dataset_id: int, budget_s: float, iterations: int) -> None:
    preprocessed = _dataset_dir("nnUNet_preprocessed", dataset_id)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnU-Net's own run_training adds to the plans it hands the trainer
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    TimedTrainer.budget_s = budget_s
    trainer = TimedTrainer(plans, CONFIGURATION, FOLD, dataset_json, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 5)
    trainer.run_training()


def predict(dataset_id: int, out_dir: str, cases: list[str]) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    raw = _dataset_dir("nnUNet_raw", dataset_id)
    results = _dataset_dir("nnUNet_results", dataset_id) / f"TimedTrainer__nnUNetPlans__{CONFIGURATION}"
    checkpoint = results / f"fold_{FOLD}" / "checkpoint_final.pth"
    # the predictor rebuilds the network from the trainer class it finds in nnunetv2 by name; TimedTrainer changes
    # only the epoch count, so the checkpoint names nnU-Net's own class
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("trainer_name") != "nnUNetTrainer":
        state["trainer_name"] = "nnUNetTrainer"
        torch.save(state, checkpoint)
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), use_folds=(FOLD,), checkpoint_name=checkpoint.name)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for case in cases:
        started = time.perf_counter()
        predictor.predict_from_files([[str(raw / "imagesTr" / f"{case}_0000.nii.gz")]],
                                     [str(Path(out_dir) / case)], save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
        print(json.dumps({"case": case, "nnunet_predict_s": round(time.perf_counter() - started, 2)}), flush=True)


if __name__ == "__main__":
    command, dataset = sys.argv[1], int(sys.argv[2])
    if command == "train":
        train(dataset, float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 250)
    elif command == "predict":
        predict(dataset, sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown command {command!r}: train or predict")
