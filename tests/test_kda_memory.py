"""KDA verify memory per request at Kimi-Linear shapes: replay record vs 16 stored states."""

import torch

from sglang_dflash.reference.kda import verify_memory_per_request

MiB = 2**20


def test_replay_record_is_far_smaller_than_intermediate_states_at_kimi_shapes():
    # Kimi-Linear-48B-A3B: 20 KDA layers, 32 heads x 128, short conv 4, bf16 activations
    mem = verify_memory_per_request(20, 32, 128, 4, block_size=16, conv_dtype=torch.bfloat16)
    print({k: f"{v / MiB:.1f} MiB" for k, v in mem.items()})
    # state: 32*128*128*4 B = 2 MiB fp32 + conv window 3*4096*3*2 B, per layer
    assert mem["committed_state"] == 20 * (2 * MiB + 3 * 4096 * 3 * 2)
    # record per layer: k, v, g fp32 [16, 32, 128] + beta fp32 [16, 32] + conv inputs bf16 [16, 12288]
    per_layer = 3 * 16 * 32 * 128 * 4 + 16 * 32 * 4 + 16 * 12288 * 2
    assert mem["replay_record"] == 20 * per_layer
    assert mem["intermediate_states"] == 16 * mem["committed_state"]
    assert mem["intermediate_states"] / MiB > 640
    assert mem["replay_record"] / MiB < 23
    assert mem["intermediate_states"] > 25 * mem["replay_record"]
