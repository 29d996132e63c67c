"""The tiny train() run the determinism tests share (spheres, bf16): its options and the
checkpoint files it leaves."""
import math

BATCH, MICRO, STEPS, SAVE = 9, 2, 8, 4
MB_PER_FULL_STEP = math.ceil(BATCH / MICRO)           # 5
BASE = dict(tokenizer="word", vocab_size=120, embed_dim=16, num_layers=2, num_heads=2, seq_len=16,
            batch_size=BATCH, micro_batch=MICRO, max_steps=STEPS, warmup_steps=2,
            learning_rate=3e-3, save_interval=SAVE, keep_checkpoints=0, eval_interval=4,
            log_interval=1, seed=99, quiet=True)


def ckpt_files(d):
    return ["final_model.cllm"] + [f"checkpoint_step_{s}.cllm" for s in range(SAVE, STEPS + 1, SAVE)]
