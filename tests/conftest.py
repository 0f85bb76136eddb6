import os

# Tests never reach a model hub, and never phone home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
