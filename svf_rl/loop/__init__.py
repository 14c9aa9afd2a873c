"""The RL loop (train.py) and what it calls: the objective, the update step, the update's forwards, the memory
model. It never names what it trains (svf_rl.policies)."""
