"""One module per training method, each a TRL config builder and a trainer builder.

`common` holds what every method shares: TrainingArguments options, LoRA, QLoRA,
DeepSpeed and the model's from_pretrained options.
"""
