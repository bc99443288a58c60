"""What DeepSpeed trains: the model built under ZeRO-3 (`model`), its tokenizer (`tokenizer`), a
GGUF imported once as a Hugging Face directory (`model_import`), the optimizer and schedule
(`optim`) and the DeepSpeed config, the project's only raw dict (`deepspeed_config`)."""
