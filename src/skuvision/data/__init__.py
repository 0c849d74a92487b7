from skuvision.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from skuvision.data.datamodule import ImageDataModule
from skuvision.data.datasets import InMemoryImages
from skuvision.data.fashion_mnist import FashionMNISTDataModule
from skuvision.data.image_folder import ImageFolderDataModule
from skuvision.data.manifest import ManifestDataModule
from skuvision.data.streaming import StreamingDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InMemoryImages",
    "ManifestDataModule",
    "StreamingDataModule",
]
