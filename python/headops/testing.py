"""Tiny randomly initialised transformers models, for tests and the ``--tiny`` runs of the
examples and the command line; and ``run_ranks``, which runs a function in several processes
as torchrun would (the tests of tensor parallelism and distributed sweeps).

Each call builds the same weights (seed 0) and leaves the caller's random state alone: the
model is initialised inside ``torch.random.fork_rng``, so making a fixture never changes what
a later ``torch.randn`` in the caller returns."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback

import torch

SEED = 0


def _seeded(build):
    # transformers initialises weights from the global RNG; fork it so the seed stays local.
    # devices=[]: CPU state only (forking CUDA states would initialise CUDA for nothing).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def tiny_llama(num_heads: int = 4, num_kv_heads: int = 2):
    """(model, None): a small random LlamaForCausalLM — 2 layers, 4 query / 2 KV heads (or those
    given), D = 16, vocabulary 97."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=16 * num_heads, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
    return _seeded(lambda: LlamaForCausalLM(cfg).eval()), None


def tiny_qwen2():
    """(model, None): a small random Qwen2ForCausalLM (biases on q, k, v) — 2 layers, 4 query / 2 KV
    heads, D = 16, vocabulary 97."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return _seeded(lambda: Qwen2ForCausalLM(cfg).eval()), None


def tiny_gpt_neox():
    """(model, None): a small random GPTNeoXForCausalLM (Pythia's family: one query_key_value
    projection holding each head's q, k and v rows together, partial rotary, parallel attention
    and MLP) — 2 layers, 4 heads, D = 16, vocabulary 97."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: GPTNeoXForCausalLM(cfg).eval()), None


def tiny_bert():
    """(model, None): a small random BertModel encoder — 2 layers, 4 heads, D = 12, vocabulary 97."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return _seeded(lambda: BertModel(cfg).eval()), None


def tiny_bart(family: str = "bart"):
    """(model, None): a small random encoder-decoder for conditional generation — BART (or Marian:
    family="marian") with 2 encoder and 3 decoder layers, 4 heads, D = 8, vocabulary 97; a
    HeadSpec for it has 2 + 3 + 3 layers (encoder, decoder, cross-attention)."""
    from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel

    config, model = {"bart": (BartConfig, BartForConditionalGeneration), "marian": (MarianConfig, MarianMTModel)}[family]
    cfg = config(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0)
    return _seeded(lambda: model(cfg).eval()), None


def tiny_whisper():
    """(model, None): a small random WhisperForConditionalGeneration — 2 encoder and 2 decoder
    layers, 4 heads, D = 8, 8 mel bins over 32 frames, vocabulary 97."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=97, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=3, begin_suppress_tokens=None, suppress_tokens=None)
    return _seeded(lambda: WhisperForConditionalGeneration(cfg).eval()), None


_LATENT_FAMILIES = {  # config class, its options beyond the shared ones (MoE layers kept tiny)
    "deepseek_v3": ("DeepseekV3Config", dict(q_lora_rank=None)),
    "deepseek_v2": ("DeepseekV2Config", dict(q_lora_rank=24)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(q_lora_rank=24, v_head_dim=24)),
    "minicpm3": ("MiniCPM3Config", dict(q_lora_rank=24)),
}
_MOE = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
            topk_group=1)


def tiny_latent_attention(family: str = "deepseek_v3"):
    """(model, None): a small random model with multi-head latent attention — DeepSeek V3 (or
    "deepseek_v2", "glm4_moe_lite" as GLM-4.7-Flash, "minicpm3"): 2 layers (the second MoE where
    the family has experts), 4 heads, keys of 16 + 8 rotary dims, values of 12 (24 for GLM, whose
    values have the keys' dim), a latent of 16, vocabulary 97."""
    import transformers

    name, options = _LATENT_FAMILIES[family]
    if family != "minicpm3":
        options = dict(_MOE, **options)
    cfg = getattr(transformers, name)(**dict(dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        pad_token_id=0, bos_token_id=1, eos_token_id=2), **options))
    return _seeded(lambda: transformers.AutoModelForCausalLM.from_config(cfg).eval()), None


_HYBRID_FAMILIES = {  # config class, its options: 4 layers, two or one of them softmax attention
    "qwen3_next": ("Qwen3NextConfig", dict(layer_types=["linear_attention", "full_attention"] * 2, head_dim=16,
                                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                           linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_5": ("Qwen3_5TextConfig", dict(layer_types=["linear_attention", "full_attention"] * 2, head_dim=16,
                                          linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                          linear_value_head_dim=8)),
    "olmo_hybrid": ("OlmoHybridConfig", dict(layer_types=["linear_attention", "linear_attention", "full_attention",
                                                          "linear_attention"])),
    "nemotron_h": ("NemotronHConfig", dict(layer_types=["linear_attention", "full_attention", "mlp", "full_attention"],
                                           head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                                           n_groups=1)),
    "jamba": ("JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1, num_experts=2, expert_layer_period=2,
                                  expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8)),
    "minimax": ("MiniMaxConfig", dict(layer_types=["linear_attention", "full_attention"] * 2, head_dim=16,
                                      num_local_experts=2, num_experts_per_tok=1)),
    "granite_hybrid": ("GraniteMoeHybridConfig", dict(layer_types=["linear_attention", "full_attention"] * 2,
                                                      mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8,
                                                      mamba_n_groups=1, num_local_experts=2, num_experts_per_tok=1)),
    # Kimi Linear: multi-head latent attention (keys of 16 + 8 dims, values of 12) beside KDA layers
    "kimi_linear": ("KimiLinearConfig", dict(layer_types=["linear_attention", "full_attention"] * 2,
                                             mlp_layer_types=["dense"] * 4, num_key_value_heads=4, kv_lora_rank=16,
                                             q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                             v_head_dim=12, linear_head_dim=16, linear_num_heads=4,
                                             moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                             n_group=1, topk_group=1)),
}


def tiny_hybrid(family: str = "qwen3_next"):
    """(model, None): a small random hybrid model, 4 layers of which some have softmax attention
    and the others not — Qwen3-Next (or "qwen3_5", "olmo_hybrid", "nemotron_h", "jamba",
    "minimax", "granite_hybrid" as Granite 4): Gated DeltaNet, Mamba, lightning-attention or MLP layers beside attention layers
    of 4 query / 2 KV heads, D = 16, vocabulary 97; "kimi_linear": KDA layers beside multi-head
    latent attention of 4 heads, values of 12 dims."""
    import transformers

    name, options = _HYBRID_FAMILIES[family]
    cfg = getattr(transformers, name)(**dict(dict(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2), **options))
    return _seeded(lambda: transformers.AutoModelForCausalLM.from_config(cfg).eval()), None


def tiny_falcon_h1():
    """(model, None): a small random Falcon-H1, whose 4 layers each run attention (4 query / 2 KV
    heads, D = 16) beside a Mamba-2 mixer (config.layer_types "hybrid"); vocabulary 97."""
    import transformers

    cfg = transformers.FalconH1Config(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_n_groups=1, mamba_d_conv=4, mamba_expand=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: transformers.AutoModelForCausalLM.from_config(cfg).eval()), None


def tiny_multimodal(family: str = "gemma4"):
    """(model, None): a small random image-text model as AutoModelForCausalLM loads the released
    checkpoints: "gemma4" (Gemma4ForConditionalGeneration: a vision and an audio tower beside a
    language model of 4 layers alternating sliding and full attention, the last 2 reading layers 0
    and 1's keys and values) or "gemma3" (Gemma3ForConditionalGeneration: a SigLIP vision tower
    beside 4 such layers); 4 query / 2 KV heads, D = 16 (32 in Gemma 4's full layers)."""
    import transformers

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, pad_token_id=0,
                layer_types=["sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    if family == "gemma4":
        cfg = transformers.Gemma4Config(
            text_config=dict(text, vocab_size_per_layer_input=300, hidden_size_per_layer_input=8, global_head_dim=32,
                             num_kv_shared_layers=2),
            vision_config=dict(vision, num_key_value_heads=2, head_dim=16),
            audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=32,
                              subsampling_conv_channels=[8, 4]))
    else:
        cfg = transformers.Gemma3Config(text_config=text, vision_config=dict(vision, image_size=32, patch_size=8),
                                        mm_tokens_per_image=4)
    return _seeded(lambda: transformers.AutoModelForCausalLM.from_config(cfg).eval()), None


def tiny_per_layer_shapes(other_kv_heads: bool = True, **options):
    """(model, None): a small random Gemma 4, whose layers differ in attention shape: five sliding
    layers (window 8) of 4 query / 2 KV heads of 16 dims, then a full-attention layer of 32-dim
    heads and (other_kv_heads, as Gemma 4's larger models: keys as values) one KV head; vocabulary
    97. `options` override the config's."""
    import transformers

    extra = dict(attention_k_eq_v=True, num_global_key_value_heads=1) if other_kv_heads else {}
    cfg = transformers.Gemma4TextConfig(**dict(dict(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8,
        sliding_window=8, global_head_dim=32, pad_token_id=0, **extra), **options))
    return _seeded(lambda: transformers.AutoModelForCausalLM.from_config(cfg).eval()), None


class CharTokenizer:
    """A character tokenizer for the tiny models (vocabulary 97), so that the text tasks
    (headops.tasks) and the discovery methods run on them as on a real model: id 0 is a newline,
    1 BOS and 2 EOS (LlamaConfig's defaults), 3..96 the characters ' ' (32) to '}' (125); any
    other character reads as a space. It has the few methods of a transformers tokenizer that
    headops uses (encode, decode, the special token ids) and no chat template."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2
    chat_template = None
    all_special_ids = [1, 2]
    vocab_size = 97

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        ids = [0 if c == "\n" else ord(c) - 29 if 32 <= ord(c) <= 125 else 3 for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        special = {self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        return "".join("\n" if i == 0 else ("" if skip_special_tokens else special[i]) if i in special
                       else chr(i + 29) for i in ids)


def planted_copy_llama():
    """A float64 tiny_llama (2 layers, 4 query / 2 KV heads, D = 16) rewired so that one head,
    query head 0 of layer 0, copies a digit of CharTokenizer's text: it attends to the context's
    digit tokens (a digit flag in the embeddings meets a constant query on RoPE's slowest pair of
    dimensions, nearly unrotated) and writes their embedding, amplified, on the residual stream,
    which the output layer (the same embeddings) reads back as that digit. Every other head's
    output and both MLPs are zero: the one head a retrieval method should find."""
    model, _ = tiny_llama()
    model = model.double()
    digits = CharTokenizer().encode("0123456789")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        E = torch.randn(97, 64, generator=g, dtype=torch.float64)
        E[:, 62] = 1.0  # a constant feature: the query's source
        E[:, 63] = 0.0
        E[digits, 63] = 3.0  # the digit flag: the key's source
        model.model.embed_tokens.weight.copy_(E)
        model.lm_head.weight.copy_(E)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight.zero_()
        attn.q_proj.weight[7, 62] = 12.0  # query head 0, dim 7: RoPE pairs dims (7, 15), the slowest
        attn.k_proj.weight.mul_(0.3)  # a little per-token spread among the digits
        attn.k_proj.weight[7] = 0.0
        attn.k_proj.weight[7, 63] = 12.0
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[:16, :16] = torch.eye(16)  # KV head 0 carries the first 16 embedding dims
        attn.o_proj.weight[:16, :16] = 20 * torch.eye(16)  # query head 0 writes them back, amplified
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """[fn(rank, *args) for each rank], each in its own process with torchrun's environment (RANK,
    WORLD_SIZE, MASTER_ADDR, ...; one torch thread), so that torch.distributed and transformers'
    tensor parallelism start from it as under ``torchrun --nproc-per-node world_size``.

    The processes are forked (Linux): they start at once with what this process imported, and `fn`
    may be any function. A forked rank cannot run a backward if this process ran its first backward
    after using fake tensors (opcheck, torch.compile): autograd then started a device thread (run
    one backward before those; tests/conftest.py does). Results come back through files (torch.save). A rank that raises, or
    processes still running after `timeout` seconds (then killed), is a RuntimeError carrying
    the ranks' tracebacks."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    port = _free_port()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="headops-ranks-") as folder:
        def result_path(rank):
            return os.path.join(folder, f"rank{rank}.pt")

        def child(rank):
            code = 0
            try:
                torch.set_num_threads(1)  # forked after the parent's thread pool ran: stay on one thread
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                  LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                outcome = ("done", fn(rank, *args))
            except BaseException:
                outcome, code = ("failed", traceback.format_exc()), 1
            try:
                torch.save(outcome, result_path(rank) + ".part")
                os.replace(result_path(rank) + ".part", result_path(rank))  # (whole, when it appears)
                sys.stdout.flush()  # (os._exit drops what Python still buffers)
                sys.stderr.flush()
                # rank 0 hosts torch.distributed's store (MASTER_ADDR:MASTER_PORT): it leaves last, so that
                # no rank still talking to the store finds it gone
                while rank == 0 and time.monotonic() < deadline and not all(
                        os.path.exists(result_path(r)) for r in range(world_size)):
                    time.sleep(0.02)
            finally:
                os._exit(code)  # not the parent's exit handlers (a forked copy of pytest, say)

        processes = [context.Process(target=child, args=(rank,)) for rank in range(world_size)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join()
        outcomes = [torch.load(result_path(rank), weights_only=False) if os.path.exists(result_path(rank)) else
                    ("failed", f"no result (exit code {processes[rank].exitcode})") for rank in range(world_size)]
    failed = [(rank, o[1]) for rank, o in enumerate(outcomes) if o[0] == "failed"]
    if hung or failed:
        raise RuntimeError((f"ranks {hung} still running after {timeout} s (killed)\n" if hung else "") +
                           "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in failed))
    return [o[1] for o in outcomes]
