"""Defaults every config starts from. Each field is documented where it is set."""

from pathlib import Path

import ml_collections

DATA = Path(__file__).resolve().parent.parent / "data"  # bundled E2E / DART / GPT-2 tokenizer


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # HF Hub id or local directory (config.json + *.safetensors)
    c.model.tokenizer = ""  # defaults to name_or_path
    c.model.param_dtype = "float32"  # dtype the frozen LM is stored in: float32 | bfloat16
    c.model.compute_dtype = ""  # activations; defaults to param_dtype
    c.model.remat = "none"  # none | full | minimal (keep q/k/v + MLP inputs); what backward recomputes per layer
    # einsum (ours) | jax (jax.nn.dot_product_attention, XLA) | cudnn (its fused cuDNN kernel: NVIDIA GPU, bf16)
    c.model.attention_kernel = "einsum"
    c.model.positions_after_prefix = ml_collections.FieldReference(None, field_type=bool)  # None: the paper's choice
    c.model.create_tiny = ""  # offline demos: build a random tiny checkpoint of this architecture if missing

    c.prefix = ml_collections.ConfigDict()
    c.prefix.method = "prefix"  # prefix | prefix_direct | embedding_only | infix (decoder-only)
    c.prefix.length = 10  # 0 with init="words": as many virtual tokens as init_text has
    c.prefix.placements = ("encoder", "decoder", "cross")  # a decoder-only model has only "decoder"
    c.prefix.mlp_hidden = 512  # the paper: 512 table-to-text, 800 summarization
    c.prefix.mlp_activation = "tanh"
    c.prefix.dropout = 0.0
    c.prefix.init = "normal"  # normal (PEFT) | uniform | zero (last MLP layer zeroed) | words (from init_text)
    c.prefix.init_text = ""  # init="words": the LM's activations on this text (e.g. "table-to-text:")
    c.prefix.init_fit_steps = 500  # init="words" with an MLP: Adam steps fitting MLP output to those activations
    c.prefix.init_fit_learning_rate = 1e-3
    c.prefix.tie = ()  # groups of placements sharing parameters, e.g. (("decoder", "cross"),)

    c.data = ml_collections.ConfigDict()
    c.data.name = ""  # HF dataset id, or "" with data_files
    c.data.config_name = ""
    # {split: local jsonl/json/csv/parquet path}; '' = unset. Settable per split: --config.data.data_files.train=...
    c.data.data_files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
    c.data.format = "fields"  # fields | e2e | dart | webnlg
    c.data.source_field = "source"
    c.data.target_field = "target"
    c.data.task_field = ""  # multi-task (format "fields"): this column names each row's task; one prefix per task
    c.data.source_prefix = ""  # prepended to every source text (e.g. "summarize: " for T5)
    c.data.target_prefix = ""
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.max_source_length = 512
    c.data.max_target_length = 64
    c.data.max_train_examples = 0  # 0: all
    c.data.max_eval_examples = 0
    # Decoder-only training: several examples per row (each sees the prefix and its own tokens only, at its own
    # positions); train.batch_size then counts rows of data.pack_width tokens (0: the longest example's width).
    c.data.pack = False
    c.data.pack_width = 0

    c.train = ml_collections.ConfigDict()
    c.train.workdir = ""  # defaults to runs/<config name>
    c.train.batch_size = 8  # global, over all devices and processes
    c.train.eval_batch_size = 0  # 0: batch_size
    c.train.epochs = 1.0
    c.train.steps = 0  # 0: epochs * steps per epoch
    c.train.stop_at = 0  # stop (with a checkpoint) after this step, keeping the schedule of train.steps; 0: run all
    c.train.seed = 0
    c.train.label_smoothing = 0.0
    # > 0: the loss runs the LM head over this many target tokens at a time and never holds the float32
    # [batch, target length, vocab] logits (same loss and gradient; for large vocabularies); 0: off.
    c.train.loss_chunk_tokens = 0
    c.train.log_every = 50
    c.train.eval_every = 0  # 0: only at the end
    c.train.save_every = 1000
    c.train.keep_checkpoints = 3
    c.train.resume = True  # continue from the latest good checkpoint in workdir
    c.train.resume_anyway = False  # resume although data/batch/seed/optimizer changed (warns; not an exact replay)
    c.train.max_nonfinite_steps = 5  # non-finite steps skipped in a row before the run stops (0: stop at the first)
    c.train.export = True  # write the materialized prefix (no MLP) to workdir/export at the end
    c.train.prefetch_depth = 2  # batches prepared and put on the devices ahead of the step (a background thread)
    c.train.grad_accum_steps = 1  # micro-batches per step (same result, less activation memory)
    c.train.eval_only = False  # only evaluate the workdir's latest checkpoint on data.eval_split (e.g. "test")

    c.eval = ml_collections.ConfigDict()
    c.eval.generate = True  # decode the eval sources at each evaluation and score them
    c.eval.metrics = ("bleu",)  # bleu | rouge
    c.eval.max_generate = 0  # distinct sources to decode per evaluation; 0: all

    c.generate = generation_options()

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-5
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.frozen = ()  # regexes of trainable-tree paths to keep fixed, e.g. ("embedding",)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, model) sizes; -1: the rest of the devices. Batch over data x fsdp
    c.mesh.lm_partitioning = "fsdp_tensor"  # replicated | fsdp | tensor | fsdp_tensor (axes of size 1 shard nothing)
    c.mesh.num_devices = 0  # 0: all visible devices
    c.mesh.coordinator_address = ""  # multi-process: host:port of process 0, or "auto" (TPU pod, SLURM, Open MPI)
    c.mesh.num_processes = 1
    c.mesh.process_id = 0
    return c


def generation_options() -> ml_collections.ConfigDict:
    """Decoding options (`generate.GenerationConfig`), shared by train.py's evaluation and predict.py."""
    g = ml_collections.ConfigDict()
    g.num_beams = 1
    g.max_new_tokens = 64
    g.length_penalty = 1.0
    g.min_new_tokens = 0
    g.no_repeat_ngram_size = 0
    g.repetition_penalty = 1.0
    g.do_sample = False  # sampling (greedy only): temperature, top_k, top_p, seeded by seed
    g.temperature = 1.0
    g.top_k = 0
    g.top_p = 1.0
    g.seed = 0
    g.forced_bos_token_id = ml_collections.FieldReference(None, field_type=int)  # e.g. 0 for BART checkpoints
    g.forced_eos_token_id = ml_collections.FieldReference(None, field_type=int)
    return g


def offline_demo(c: ml_collections.ConfigDict, architecture: str) -> ml_collections.ConfigDict:
    """`c` turned into an offline demo: a random tiny `architecture` LM built in artifacts/ on first use,
    trained on the bundled E2E dev set and evaluated on the bundled test set, in a few minutes on a CPU."""
    c.model.name_or_path = f"artifacts/tiny-{architecture}"
    c.model.create_tiny = architecture
    c.prefix.mlp_hidden = 64
    c.data.name = ""
    c.data.format = "e2e"
    c.data.data_files.train = str(DATA / "e2e/devset.csv")
    c.data.data_files.validation = str(DATA / "e2e/testset_w_refs.csv")
    c.data.max_source_length = 64
    c.data.max_target_length = 64
    c.data.max_eval_examples = 256
    c.eval.metrics = ("bleu",)
    c.eval.max_generate = 32
    c.generate.num_beams = 1
    c.generate.max_new_tokens = 32
    c.train.batch_size = 16
    c.train.epochs = 1.0
    c.train.steps = 200
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.optim.learning_rate = 5e-3
    c.optim.warmup_steps = 20
    return c
