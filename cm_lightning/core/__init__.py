"""The math as pure functions and tiny classes: σ grids and scalings (karras), the probability-flow ODE step
(ode), distances (losses), curricula (recipes), one class per training objective (objectives), seeded noise
(noise), EMAs (ema), LR schedules, and the small policies every method shares (structure: the checkpoint
guard; nonfinite; compile). Imports nothing else of cm_lightning."""
