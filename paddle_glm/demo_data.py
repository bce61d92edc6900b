"""Small, learnable demo data sets, generated offline: DuReaderQG question generation, BELLE instructions and
ADGEN advertisement texts.

Every target is a deterministic function of what the model sees: a question is fixed by the
template and the answer's slot and copies entity names from the context; a BELLE output copies,
reverses, repeats or adds what the instruction holds; an ADGEN description is one phrase per attribute of
the `key#value*key#value` list, in its order, copying the values. A tiny GLM trained from scratch can learn
these mappings in CPU minutes, and the dev set (other seed, other entity combinations) measures
whether it learnt to copy rather than to remember.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from .data import write_json_lines

__all__ = ["qg_records", "belle_records", "adgen_records", "write_demo_splits", "demo_texts", "CITIES"]

# ---------------------------------------------------------------------------------------------
# Entity tables
# ---------------------------------------------------------------------------------------------

CAPITALS = [  # (capital, country, continent)
    ("北京", "中国", "亚洲"), ("东京", "日本", "亚洲"), ("首尔", "韩国", "亚洲"), ("曼谷", "泰国", "亚洲"),
    ("河内", "越南", "亚洲"), ("新德里", "印度", "亚洲"), ("雅加达", "印度尼西亚", "亚洲"),
    ("巴黎", "法国", "欧洲"), ("伦敦", "英国", "欧洲"), ("柏林", "德国", "欧洲"), ("罗马", "意大利", "欧洲"),
    ("马德里", "西班牙", "欧洲"), ("莫斯科", "俄罗斯", "欧洲"), ("维也纳", "奥地利", "欧洲"), ("雅典", "希腊", "欧洲"),
    ("里斯本", "葡萄牙", "欧洲"), ("华沙", "波兰", "欧洲"), ("布拉格", "捷克", "欧洲"), ("奥斯陆", "挪威", "欧洲"),
    ("开罗", "埃及", "非洲"), ("内罗毕", "肯尼亚", "非洲"), ("阿布贾", "尼日利亚", "非洲"),
    ("堪培拉", "澳大利亚", "大洋洲"), ("惠灵顿", "新西兰", "大洋洲"),
    ("渥太华", "加拿大", "北美洲"), ("华盛顿", "美国", "北美洲"), ("墨西哥城", "墨西哥", "北美洲"),
    ("巴西利亚", "巴西", "南美洲"), ("利马", "秘鲁", "南美洲"), ("布宜诺斯艾利斯", "阿根廷", "南美洲"),
]
CITIES = [
    "上海", "广州", "深圳", "杭州", "成都", "武汉", "西安", "南京", "重庆", "天津", "苏州", "长沙", "郑州",
    "青岛", "大连", "厦门", "昆明", "哈尔滨", "沈阳", "济南", "福州", "合肥", "南昌", "贵阳", "兰州", "太原",
    "石家庄", "南宁", "海口", "拉萨", "银川", "西宁", "呼和浩特", "乌鲁木齐",
]
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾田董潘袁蔡蒋余杜叶程魏苏"
GIVEN_NAMES = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞刚英华玉兰红佳思雨欣晨浩宇子轩梓涵一诺博文雪琳"
JOBS = ["医生", "教师", "律师", "工程师", "记者", "画家", "厨师", "飞行员", "建筑师", "作家", "护士", "摄影师", "程序员", "会计", "演员", "科学家"]
COMPANY_PREFIXES = ["华光", "星辰", "远航", "天宇", "金石", "青松", "长风", "明月", "云海", "东方", "北辰", "新禾"]
INDUSTRIES = ["科技", "电子", "食品", "汽车", "医药", "家电"]
PRODUCTS = ["智能手表", "无线耳机", "平板电脑", "电动汽车", "扫地机器人", "咖啡机", "空气净化器", "运动鞋", "笔记本电脑", "智能音箱", "电饭煲", "吸尘器"]
VEHICLES = ["高铁", "汽车", "飞机", "轮船", "火车"]
RIVER_PREFIXES = ["清水", "白沙", "青龙", "黑石", "金沙", "碧波", "红柳", "玉带", "龙泉", "桃花"]
MOUNTAINS = ["云雾山", "太白山", "苍岭山", "雪峰山", "紫金山", "天柱山", "凤凰山", "九华山"]
WATERS = ["东海", "南海", "黄海", "渤海", "太平洋", "洞庭湖", "鄱阳湖"]
SCHOOL_NUMBERS = ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二"]
TITLE_WORDS = ["星空", "海洋", "春天", "故乡", "月光", "时间", "远方", "少年", "森林", "灯塔", "雪花", "风筝", "梦想", "秘密"]
GENRES = ["长篇小说", "散文集", "诗集", "童话", "科幻小说", "历史小说"]


def _person(rng: random.Random) -> str:
    """A synthetic name: one surname and one or two given-name characters."""
    return rng.choice(SURNAMES) + "".join(rng.choices(GIVEN_NAMES, k=rng.randint(1, 2)))


# ---------------------------------------------------------------------------------------------
# DuReaderQG: templates over facts
# ---------------------------------------------------------------------------------------------

Slots = Dict[str, str]


@dataclass(frozen=True)
class QGTemplate:
    """A context format over named slots and, per answer slot, the question it asks."""

    facts: Callable[[random.Random], Slots]
    context: str
    questions: Dict[str, str]


def _capital_facts(rng: random.Random) -> Slots:
    city, country, continent = rng.choice(CAPITALS)
    return {"city": city, "country": country, "continent": continent, "population": f"{rng.randint(50, 3000)}万"}


def _person_facts(rng: random.Random) -> Slots:
    return {"name": _person(rng), "year": f"{rng.randint(1950, 2005)}年", "job": rng.choice(JOBS), "hometown": rng.choice(CITIES)}


def _product_facts(rng: random.Random) -> Slots:
    return {
        "company": rng.choice(COMPANY_PREFIXES) + rng.choice(INDUSTRIES) + "公司",
        "year": f"{rng.randint(1990, 2023)}年",
        "product": f"{rng.choice(PRODUCTS)}{rng.choice('ABCDEKMSX')}{rng.randint(1, 9)}",
        "price": f"{rng.randint(99, 9999)}元",
    }


def _trip_facts(rng: random.Random) -> Slots:
    origin, destination = rng.sample(CITIES, 2)
    return {
        "origin": origin, "destination": destination, "distance": f"{rng.randint(50, 3000)}公里",
        "vehicle": rng.choice(VEHICLES), "hours": f"{rng.randint(1, 30)}小时",
    }


def _river_facts(rng: random.Random) -> Slots:
    return {
        "river": rng.choice(RIVER_PREFIXES) + rng.choice("江河溪"), "length": f"{rng.randint(30, 3000)}公里",
        "mountain": rng.choice(MOUNTAINS), "water": rng.choice(WATERS),
    }


def _school_facts(rng: random.Random) -> Slots:
    return {
        "school": f"{rng.choice(CITIES)}第{rng.choice(SCHOOL_NUMBERS)}中学", "year": f"{rng.randint(1900, 2015)}年",
        "students": f"{rng.randint(300, 5000)}人", "principal": _person(rng),
    }


def _marathon_facts(rng: random.Random) -> Slots:
    return {"year": f"{rng.randint(2000, 2023)}年", "city": rng.choice(CITIES), "winner": _person(rng), "minutes": f"{rng.randint(125, 200)}分钟"}


def _book_facts(rng: random.Random) -> Slots:
    first, second = rng.sample(TITLE_WORDS, 2)
    return {"title": f"{first}的{second}", "author": _person(rng), "genre": rng.choice(GENRES), "chapters": f"{rng.randint(8, 60)}章"}


QG_TEMPLATES = [
    QGTemplate(_capital_facts, "{city}是{country}的首都，位于{continent}，人口约{population}。", {
        "city": "{country}的首都是哪里？", "continent": "{city}位于哪个大洲？", "population": "{city}的人口约有多少？",
    }),
    QGTemplate(_person_facts, "{name}出生于{year}，是一名{job}，家乡在{hometown}。", {
        "year": "{name}出生于哪一年？", "job": "{name}的职业是什么？", "hometown": "{name}的家乡在哪里？",
        "name": "哪位{job}出生于{year}？",
    }),
    QGTemplate(_product_facts, "{company}于{year}推出了{product}，售价为{price}。", {
        "product": "{company}在{year}推出了什么产品？", "year": "{company}在哪一年推出了{product}？",
        "price": "{product}的售价是多少？", "company": "哪家公司推出了{product}？",
    }),
    QGTemplate(_trip_facts, "从{origin}到{destination}约{distance}，乘坐{vehicle}大约需要{hours}。", {
        "distance": "从{origin}到{destination}有多远？", "hours": "乘坐{vehicle}从{origin}到{destination}要多久？",
        "vehicle": "从{origin}到{destination}可以乘坐什么？",
    }),
    QGTemplate(_river_facts, "{river}全长约{length}，发源于{mountain}，最终流入{water}。", {
        "length": "{river}全长约多少公里？", "mountain": "{river}发源于哪座山？", "water": "{river}最终流入哪里？",
        "river": "哪条河发源于{mountain}并流入{water}？",
    }),
    QGTemplate(_school_facts, "{school}成立于{year}，现有学生{students}，校长是{principal}。", {
        "year": "{school}成立于哪一年？", "students": "{school}现有多少名学生？", "principal": "{school}的校长是谁？",
        "school": "{principal}是哪所学校的校长？",
    }),
    QGTemplate(_marathon_facts, "在{year}{city}马拉松比赛中，{winner}以{minutes}的成绩获得冠军。", {
        "winner": "{year}{city}马拉松的冠军是谁？", "minutes": "{winner}跑完{city}马拉松用了多久？",
        "city": "{winner}在哪个城市的马拉松夺冠？",
    }),
    QGTemplate(_book_facts, "《{title}》是{author}创作的一部{genre}，全书共{chapters}。", {
        "author": "《{title}》的作者是谁？", "genre": "《{title}》是一部什么作品？", "chapters": "《{title}》共有多少章？",
        "title": "{author}创作了哪部{genre}？",
    }),
]


def _qg_passage(rng: random.Random) -> List[dict]:
    """One filled template asked about one to three of its slots (same context, different questions)."""
    template = rng.choice(QG_TEMPLATES)
    slots = template.facts(rng)
    context = template.context.format(**slots)
    asked = rng.sample(list(template.questions), rng.randint(1, 3))
    return [{"context": context, "answer": slots[slot], "question": template.questions[slot].format(**slots)} for slot in asked]


def qg_records(count: int, seed: int) -> List[dict]:
    """`count` DuReaderQG records `{"context", "answer", "question"}`, shuffled, reproducible from `seed`."""
    rng = random.Random(seed)
    records: List[dict] = []
    while len(records) < count:
        records.extend(_qg_passage(rng))
    del records[count:]
    rng.shuffle(records)
    return records


# ---------------------------------------------------------------------------------------------
# BELLE: deterministic instructions, single- and multi-turn
# ---------------------------------------------------------------------------------------------

Exchange = Tuple[str, str]  # (human, assistant)
CITY_SENTENCES = ["{name}明天要去{city}出差。", "{name}在{city}工作了{n}年。", "听说{city}的秋天很美。", "{name}的家乡在{city}。", "我们下个月去{city}旅游。"]


def _word(rng: random.Random) -> str:
    return _person(rng) if rng.random() < 0.5 else rng.choice(CITIES + JOBS + PRODUCTS)


def _city_sentence(rng: random.Random, city: str) -> str:
    return rng.choice(CITY_SENTENCES).format(name=_person(rng), city=city, n=rng.randint(2, 20))


def _ask_sum(rng: random.Random) -> Exchange:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"


def _ask_capital(rng: random.Random) -> Exchange:
    city, country, _ = rng.choice(CAPITALS)
    return f"{country}的首都是哪里？", f"{country}的首都是{city}。"


def _ask_larger(rng: random.Random) -> Exchange:
    a, b = rng.sample(range(1, 100), 2)
    return f"{a}和{b}哪个数更大？", f"{max(a, b)}更大。"


def _ask_triple(rng: random.Random) -> Exchange:
    word = _word(rng)
    return f"请把“{word}”重复三遍。", word * 3


def _extract_city(rng: random.Random) -> Tuple[str, str, str]:
    city = rng.choice(CITIES)
    return "提取下面句子中的城市名。", _city_sentence(rng, city), city


def _add_numbers(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return "把下面的数字相加。", f"{a}和{b}", str(a + b)


def _reverse_word(rng: random.Random) -> Tuple[str, str, str]:
    word = _word(rng)
    return "将下面的词语倒序输出。", word, word[::-1]


def _repeat_sentence(rng: random.Random) -> Tuple[str, str, str]:
    sentence = _city_sentence(rng, rng.choice(CITIES))
    return "重复下面的句子两遍。", sentence, sentence * 2


def _name_dialogue(rng: random.Random) -> List[Exchange]:
    name = _person(rng)
    return [(f"我叫{name}，请记住我的名字。", f"好的，{name}，我记住了。"), ("我叫什么名字？", f"你叫{name}。")]


def _sum_dialogue(rng: random.Random) -> List[Exchange]:
    a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 50)
    return [(f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"), (f"再加上{c}呢？", f"{a + b}加{c}等于{a + b + c}。")]


def _capital_dialogue(rng: random.Random) -> List[Exchange]:
    city, country, continent = rng.choice(CAPITALS)
    return [(f"{country}的首都是哪里？", f"{country}的首都是{city}。"), ("它位于哪个大洲？", f"{city}位于{continent}。")]


def _reverse_dialogue(rng: random.Random) -> List[Exchange]:
    word = _word(rng)
    return [(f"请把“{word}”倒过来写。", word[::-1]), ("再正着写一遍。", word)]


PLAIN_TASKS = [_ask_sum, _ask_capital, _ask_larger, _ask_triple]
INPUT_TASKS = [_extract_city, _add_numbers, _reverse_word, _repeat_sentence]
DIALOGUES = [_name_dialogue, _sum_dialogue, _capital_dialogue, _reverse_dialogue]


def _plain_record(rng: random.Random) -> dict:
    instruction, output = rng.choice(PLAIN_TASKS)(rng)
    return {"instruction": instruction, "input": "", "output": output}


def _input_record(rng: random.Random) -> dict:
    instruction, text, output = rng.choice(INPUT_TASKS)(rng)
    return {"instruction": instruction, "input": text, "output": output}


def _conversation_record(rng: random.Random) -> dict:
    turns = []
    for human, assistant in rng.choice(DIALOGUES)(rng):
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": assistant}]
    return {"conversations": turns}


def _text_dialogue_record(rng: random.Random) -> dict:
    """BELLE's multi-turn text: earlier turns and the last question in `instruction`, the last answer in `output`."""
    exchanges = rng.choice(DIALOGUES)(rng)
    lines = [f"Human: {human}\nAssistant: {assistant}" for human, assistant in exchanges[:-1]]
    last_human, last_answer = exchanges[-1]
    return {"instruction": "\n".join(lines + [f"Human: {last_human}"]), "output": last_answer}


RECORD_FORMS = [_plain_record, _input_record, _conversation_record, _text_dialogue_record]


def belle_records(count: int, seed: int) -> List[dict]:
    """`count` BELLE records, the four forms in turn (then shuffled), reproducible from `seed`."""
    rng = random.Random(seed)
    records = [RECORD_FORMS[index % len(RECORD_FORMS)](rng) for index in range(count)]
    rng.shuffle(records)
    return records


# ---------------------------------------------------------------------------------------------
# ADGEN: clothing attributes -> an advertisement text
# ---------------------------------------------------------------------------------------------

# (attribute, its values, the phrase it contributes), in the order a content line lists them. ADGEN's own keys
# (类型, 版型, 风格, 图案, 材质, 颜色, 衣样式, 衣袖长); the values and phrases are made up here.
ADGEN_ATTRIBUTES = [
    ("版型", ["宽松", "修身", "直筒", "阔腿", "A字", "收腰"], "{}的版型穿起来很显瘦"),
    ("材质", ["纯棉", "牛仔布", "针织", "雪纺", "羊毛", "真丝"], "采用{}面料，触感柔软"),
    ("颜色", ["白色", "黑色", "蓝色", "红色", "卡其色", "粉色"], "{}的配色干净大方"),
    ("风格", ["休闲", "通勤", "复古", "简约", "甜美", "街头"], "整体透出{}风格"),
    ("图案", ["条纹", "格子", "纯色", "印花", "刺绣", "碎花"], "{}图案增添了细节"),
    ("衣袖长", ["短袖", "长袖", "七分袖", "无袖"], "{}的设计清爽利落"),
]
ADGEN_TYPES = ["上衣", "衬衫", "卫衣", "外套", "连衣裙", "半身裙", "牛仔裤", "阔腿裤", "毛衣", "风衣"]


def _adgen_record(rng: random.Random) -> dict:
    """类型 and two to four other attributes, in table order; the summary opens with the type and gives one phrase
    per attribute."""
    kind = rng.choice(ADGEN_TYPES)
    chosen = sorted(rng.sample(range(len(ADGEN_ATTRIBUTES)), rng.randint(2, 4)))
    pairs = [("类型", kind)] + [(ADGEN_ATTRIBUTES[i][0], rng.choice(ADGEN_ATTRIBUTES[i][1])) for i in chosen]
    phrases = [ADGEN_ATTRIBUTES[i][2].format(value) for i, (_, value) in zip(chosen, pairs[1:])]
    return {"content": "*".join(f"{key}#{value}" for key, value in pairs),
            "summary": f"这款{kind}，" + "，".join(phrases) + "。"}


def adgen_records(count: int, seed: int) -> List[dict]:
    """`count` ADGEN records `{"content", "summary"}` (ChatGLM-6B's ptuning example's fields), reproducible from
    `seed`."""
    rng = random.Random(seed)
    return [_adgen_record(rng) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

GENERATORS: Dict[str, Callable[[int, int], List[dict]]] = {"qg": qg_records, "belle": belle_records,
                                                           "adgen": adgen_records}


def write_demo_splits(directory: str, kind: str, train: int, dev: int, seed: int = 0) -> Dict[str, str]:
    """Write `train.json` and `dev.json` of `kind` ("qg", "belle" or "adgen") into `directory`; returns their paths.

    The splits use different seeds (2*seed and 2*seed+1): same templates, mostly different entities.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown demo data kind {kind!r}: choose one of {', '.join(GENERATORS)}")
    paths = {}
    for offset, (split, count) in enumerate((("train", train), ("dev", dev))):
        paths[split] = os.path.join(directory, f"{split}.json")
        write_json_lines(GENERATORS[kind](count, 2 * seed + offset), paths[split])
    return paths


def demo_texts(records: Iterable[dict]) -> Iterator[str]:
    """Every non-empty text field of the records, conversation turns included (to train a vocabulary)."""
    for record in records:
        for key, value in record.items():
            if key == "conversations":
                yield from (turn["value"] for turn in value)
            elif isinstance(value, str) and value:
                yield value
