#!/usr/bin/env bash
# QAE in SkyRL: GRPO-style training of Qwen2.5-1.5B-Instruct on GSM8K with the group's
# K-quantile as baseline (trainer.algorithm.advantage_estimator=qae).
#
# Needs: pip install 'qae[skyrl]' (Python 3.12) plus SkyRL's GPU stack (its vllm extra) on
# every node; GSM8K in SkyRL's parquet format (SkyRL's examples/gsm8k/gsm8k_dataset.py
# writes it). Defaults below are for one node with 4 GPUs; set the paths and NUM_GPUS
# through the environment. Extra arguments are passed on: SkyRL overrides, more qae.*
# options, or --print-config to print the composed config and exit without training.
set -euo pipefail

DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-1.5B-Instruct}
CKPT_DIR=${CKPT_DIR:-$HOME/ckpts/qae-gsm8k-1.5b}
NUM_GPUS=${NUM_GPUS:-4}
QUANTILE_K=${QUANTILE_K:-0.4}  # the authors' advice: start at 0.4, 0.6 if entropy collapses

python -m qae.integrations.skyrl \
    qae.k="${QUANTILE_K}" \
    qae.quantile_method=inverted_cdf \
    data.train_data="['${DATA_DIR}/train.parquet']" \
    data.val_data="['${DATA_DIR}/validation.parquet']" \
    trainer.algorithm.advantage_estimator=qae \
    trainer.algorithm.grpo_norm_by_std=true \
    trainer.algorithm.use_kl_loss=false \
    trainer.algorithm.eps_clip_low=0.2 \
    trainer.algorithm.eps_clip_high=0.28 \
    trainer.algorithm.loss_reduction=token_mean \
    trainer.policy.model.path="${MODEL_PATH}" \
    trainer.policy.optimizer_config.lr=1.0e-6 \
    trainer.placement.colocate_all=true \
    trainer.strategy=fsdp2 \
    trainer.placement.policy_num_gpus_per_node="${NUM_GPUS}" \
    trainer.placement.ref_num_gpus_per_node="${NUM_GPUS}" \
    generator.n_samples_per_prompt=16 \
    generator.sampling_params.max_generate_length=1024 \
    trainer.epochs=20 \
    trainer.train_batch_size=256 \
    trainer.policy_mini_batch_size=64 \
    trainer.micro_forward_batch_size_per_gpu=16 \
    trainer.micro_train_batch_size_per_gpu=16 \
    trainer.max_prompt_length=512 \
    trainer.eval_interval=5 \
    trainer.eval_before_train=true \
    trainer.ckpt_interval=10 \
    trainer.ckpt_path="${CKPT_DIR}" \
    trainer.logger=console \
    trainer.project_name=qae-gsm8k \
    trainer.run_name=qae-k"${QUANTILE_K}" \
    environment.env_class=gsm8k \
    "$@"
