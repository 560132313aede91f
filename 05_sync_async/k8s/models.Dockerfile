# The ImageNet models as an image of their own, copied by each pod's init container into an
# emptyDir (README, "On Kubernetes"): 120 MB is too large for git and for a ConfigMap (1 MiB),
# and a node pulls an image once and keeps it, so a worker that KEDA adds on a node that ran one
# before starts from the node's disk. A new model is a new tag, rolled out like code.
#   make -C .. models     # builds ../models/imagenet/
#   docker build -f 05_sync_async/k8s/models.Dockerfile -t ml-serving-patterns/sync-async-models:1 models/imagenet
FROM busybox:1.37.0
COPY efficientnet_lite0.onnx resnet50.onnx labels.json /models/imagenet/
USER 65534:65534
