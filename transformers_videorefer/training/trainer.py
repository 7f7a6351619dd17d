"""TRL's `SFTTrainer` for VideoRefer: per-module learning rates and bookkeeping of skipped samples."""

from trl import SFTTrainer

from .stages import parameter_groups


class VideoReferSFTTrainer(SFTTrainer):
    """
    [`trl.SFTTrainer`] fed by [`VideoReferDataCollator`] (the dataset holds raw upstream samples, decoded per batch).

    - With `args.new_modules_learning_rate` set, the connector and the object encoder train at that learning rate and
      the rest at `args.learning_rate` (both follow the schedule).
    - The ids of samples the collator skipped are kept in `skipped_samples` (this process only, each id once) and
      their count is logged as `skipped_samples`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_samples: dict[str, None] = {}  # ids in the order first seen

    def create_optimizer(self, model=None):
        new_modules_learning_rate = getattr(self.args, "new_modules_learning_rate", None)
        if self.optimizer is None and new_modules_learning_rate is not None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(
                opt_model.named_parameters(),
                self.get_decay_parameter_names(opt_model),
                self.args.weight_decay,
                new_modules_learning_rate,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped_samples.update(dict.fromkeys(inputs.pop("skipped_samples", ())))
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["skipped_samples"] = len(self.skipped_samples)
        super().log(logs, start_time)


__all__ = ["VideoReferSFTTrainer"]
