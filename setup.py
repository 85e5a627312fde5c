from setuptools import setup

setup(
    name="pyrnn",
    version="0.1.0",
    description="Minimal, exact RNN / LSTM / GRU language-model trainer in C and CUDA, with a NumPy oracle",
    packages=["pyrnn"],
    python_requires=">=3.9",
    setup_requires=["cffi>=1.15"],
    install_requires=["numpy", "cffi>=1.15"],
    extras_require={"plot": ["matplotlib"], "torch": ["torch"], "test": ["pytest"]},
    cffi_modules=["pyrnn/_build.py:ffibuilder"],
    entry_points={"console_scripts": ["pyrnn=pyrnn.__main__:main"]},
)
