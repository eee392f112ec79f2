"""What a model learned: counterfactual switches, reliance, probes and Grad-CAM."""
