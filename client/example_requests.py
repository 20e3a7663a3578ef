#!/usr/bin/env python3
"""The original Flask server's client example, unchanged except the URL (port 9000).

python client/example_requests.py example.jpg
"""

import base64
import json
import sys
from pathlib import Path

import requests

# 服务器URL
url = "http://localhost:9000/v1/chat/completions"

# 读取并编码图像
image_path = Path(sys.argv[1] if len(sys.argv) > 1 else "example.jpg")
with open(image_path, "rb") as image_file:
    base64_image = base64.b64encode(image_file.read()).decode("utf-8")

# 创建请求负载
payload = {
    "messages": [
        {"role": "system", "content": "你是一个能描述图像的有帮助的助手。"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "这张图片里有什么？"},
                {
                    "type": "image_url",
                    "image_url": {"url": f"data:image/jpeg;base64,{base64_image}"},
                },
            ],
        },
    ],
    "model": "qwen2.5-vl-7b-instruct",
    "max_tokens": 1280,
}

# 发送请求
response = requests.post(url, json=payload)

# 打印响应
print(json.dumps(response.json(), indent=2))
