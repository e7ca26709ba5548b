"""The reproduction's evaluation of one row: linear probe and k-NN on frozen features over the evaluation seeds, and
the short fine-tune that is the same for every row."""

from __future__ import annotations

import os

from modeling_mimco.experiments.reproduction_arguments import POOLINGS


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) of repeated measurements, with the values themselves."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def frozen_feature_scores(args, splits: list, checkpoint: str, key: str, features_dir: str) -> dict:
    """Linear probe and k-NN top-1 with CLS and mean-patch features on the first evaluation seed's subsets (the test
    features are saved for the t-SNE), and the spread of the CLS scores over every evaluation seed in `splits`: each
    draws its own training and test subsets and its own probe initialisation and batch order."""
    import torch

    from modeling_mimco.evaluation.frozen_features import LinearProbeConfig, evaluate_frozen_features, extract_features
    from modeling_mimco.interop.model_folders import load_backbone

    backbone = load_backbone(checkpoint, model_preset=args.model_preset, seed=args.seed)
    scores = {"feature_source": backbone.source, "feature_dim": backbone.feature_dim}
    eval_seeds = evaluation_seeds(args)
    probe_scores: dict[str, list[float]] = {"linear_probe_top1_cls": [], "knn_top1_cls": []}
    for index, (eval_seed, data) in enumerate(zip(eval_seeds, splits)):
        probe = LinearProbeConfig(epochs=args.probe_epochs, seed=eval_seed)
        for pooling in POOLINGS if index == 0 else ("cls",):
            common = dict(
                pooling=pooling, batch_size=256, num_workers=args.num_workers, device=evaluation_device(args)
            )
            train_x, train_y = extract_features(backbone, data.train, data.image_column, data.label_column, **common)
            test_x, test_y = extract_features(backbone, data.eval, data.image_column, data.label_column, **common)
            result = evaluate_frozen_features(train_x, train_y, test_x, test_y, data.num_labels, probe)
            if pooling == "cls":
                probe_scores["linear_probe_top1_cls"].append(result["linear_probe_top1"])
                probe_scores["knn_top1_cls"].append(result["knn_top1"])
            if index > 0:
                continue
            scores[f"linear_probe_top1_{pooling}"] = result["linear_probe_top1"]
            scores[f"knn_top1_{pooling}"] = result["knn_top1"]
            if pooling == "cls":
                os.makedirs(features_dir, exist_ok=True)
                torch.save({"features": test_x, "labels": test_y}, os.path.join(features_dir, f"{key}.pt"))
            scores["num_probe_train_images"], scores["num_test_images"] = len(train_y), len(test_y)
    scores["evaluation_seeds"] = eval_seeds
    scores["evaluation_spread"] = {metric: spread(values) for metric, values in probe_scores.items()}
    return scores


def evaluation_device(args) -> str:
    """`--eval_device` resolved: "cpu", or "cuda" when `auto` finds a GPU."""
    import torch

    return "cuda" if args.eval_device == "auto" and torch.cuda.is_available() else "cpu"


def evaluation_seeds(args) -> list[int]:
    return [args.eval_seed + offset for offset in range(args.eval_repeats)]


def load_evaluation_splits(args) -> list:
    """The probe's training subset and the test subset for every evaluation seed (the first is the table's)."""
    from modeling_mimco.data.sources import load_classification_splits

    return [
        load_classification_splits(
            dataset_name=args.dataset_name,
            eval_split="test",
            max_train_samples=args.probe_train_samples,
            max_eval_samples=args.eval_samples,
            seed=eval_seed,
        )
        for eval_seed in evaluation_seeds(args)
    ]


def finetune_arguments(args, checkpoint: str, output_dir: str) -> tuple:
    """`run_finetuning`'s arguments: the same short recipe for every row."""
    from modeling_mimco.commands import run_finetuning

    model_args = run_finetuning.ModelArguments(
        model_name_or_path=checkpoint, layer_decay=0.75, drop_path_rate=0.0, pooling="cls"
    )
    # a short schedule: light augmentation (crop + flip), no MixUp / CutMix / erasing, which need long runs
    data_args = run_finetuning.DataTrainingArguments(
        dataset_name=args.dataset_name,
        max_train_samples=args.finetune_samples,
        max_eval_samples=args.eval_samples,
        rand_augment_num_ops=0,
        random_erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
        crop_min_scale=0.35,
    )
    training_args = run_finetuning.FineTuningArguments(
        output_dir=output_dir,
        num_train_epochs=args.finetune_epochs,
        per_device_train_batch_size=128,
        per_device_eval_batch_size=256,
        learning_rate=args.finetune_learning_rate,
        warmup_steps=0.1,
        label_smoothing_factor=0.1,
        weight_decay=0.05,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.eval_seed,
        dataloader_num_workers=args.num_workers,
        logging_steps=20,
        use_cpu=evaluation_device(args) == "cpu",
        disable_tqdm=True,
    )
    return model_args, data_args, training_args


def finetune_top1(args, checkpoint: str, output_dir: str) -> float:
    from modeling_mimco.commands import run_finetuning

    metrics = run_finetuning.run_finetuning(*finetune_arguments(args, checkpoint, output_dir))
    return float(metrics["eval_accuracy"])
