"""Small random `transformers` models, every weight perturbed, for parity tests."""

import torch
import transformers


def randomize(torch_model):
    """Every weight random (biases and norm scales too), so a mis-mapped tensor cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.normal_(0.0, 0.2 if p.ndim == 1 else 0.05)
            if p.ndim == 1:
                p.add_(1.0 if p.shape[0] == torch_model.config.hidden_size else 0.0)
    return torch_model.eval()


def gpt2(vocab_size: int = 97, n_positions: int = 48):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=3, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return randomize(transformers.GPT2LMHeadModel(config))


def llama(tie: bool, rope_scaling: bool, vocab_size: int = 101):
    rope = dict(rope_type="default", rope_theta=10_000.0)
    if rope_scaling:
        # A short original context so all three frequency bands of the Llama-3.1 rule occur.
        rope = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rope_parameters=rope,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )
    return randomize(transformers.LlamaForCausalLM(config))
