"""One LightningModule per training method over the shared base (``GenerativeModule``): the consistency
base with f_θ and ``init_from`` (consistency), CT / iCT (consistency_training), the EDM teacher (diffusion),
CD (distillation) and ECT (easy_tuning). Stands on ``core``, ``nets``, ``sampling`` and ``io``."""
