"""The console commands, one module each: train (train_model), inference (cllm_inference),
evaluate (cllm_eval), export (cllm_export), tokenize (cllm_tokenize), plot (cllm_plot). Each
parses its arguments, calls the packages below and turns failures into one line on stderr."""
