"""pytorch-grad-cam's class for each of our method names: the reference of the CAM tests and
of ``benchmarks/bench_cam.py``. Methods that are no BaseCAM class there (SobelCAM, Deep
Feature Factorization) or not in it at all (ReciproCAM) are compared in their own tests."""

from pytorch_grad_cam import (
    FEM,
    KPCA_CAM,
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    ScoreCAM,
    XGradCAM,
)

REFERENCE_CLASSES = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "kpcacam": KPCA_CAM,
    "fem": FEM,
    "randomcam": RandomCAM,
}
