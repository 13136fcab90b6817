"""Alignment: instruction SFT, reward models, PPO and DPO (InstructGPT's pipeline, Ouyang et al. 2022).

``losses``   the formulas, pure torch: Bradley-Terry, DPO/IPO, GAE, clipped PPO, KL estimators, KL controllers
``rollout``  left-padded prompts, sampled completions and their log-probabilities
``rewards``  scorers for PPO and for building preference data (VADER, arithmetic, a trained reward model)
"""
