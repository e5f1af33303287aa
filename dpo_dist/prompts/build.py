"""Regenerate the three prompt sets shipped with dpo_dist.

    python dpo_dist/prompts/build.py [--out-dir DIR]

rewrites, next to this script (or in DIR):

* ``identity_train.jsonl`` -- identity questions to train on (name, creator, model, comparisons
  with other assistants, introductions, indirect questions, role/context prompts), English and
  about 10% Chinese, in many registers (formal, casual, terse, rude, playful, lowercase, typos).
* ``identity_eval.jsonl`` -- held-out identity questions, written by hand with their own phrasing
  families, so that no wording of the eval set appears in the train set.
* ``general.jsonl`` -- general instructions unrelated to identity (facts, how-to, writing, maths,
  code), to check that training changed nothing else.

Each line is ``{"id", "prompt", "category", "lang"}``. The questions are model-agnostic: they never
name the model being trained or its maker.

How the train set is built: hand-written base questions per category, plus a limited number of
variants of them (an opener or a closing remark, lowercase or texting style, one realistic typo,
two short questions asked together), plus a few comparison templates each filled with a couple of
assistant names. A candidate is dropped when its wording is (nearly) an eval question: after
normalisation (case, punctuation, contractions, texting spellings) an eval question must not occur
inside it and the two must not be more than ``NEAR_DUP`` similar (difflib ratio). The whole
``what is your name`` / ``are you X?`` / ``name and organization`` families therefore live only in
the eval set.

Deterministic: standard library only, fixed seeds, no iteration over sets. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240521
TRAIN_TARGET = {"en": 1100, "zh": 135}
NEAR_DUP = 0.80
MAX_VARIANTS_PER_BASE = 3

# Never in an identity prompt (they would leak the model's old or new identity into the question).
IDENTITY_FORBIDDEN = ("smollm", "smol", "qwen", "hugging", "alibaba", "deep", "通义", "千问", "阿里", "抱抱脸")
# Never in a general prompt.
GENERAL_FORBIDDEN = (
    "your name", "who are you", "assistant", "ai model", "language model", "chatbot", "smollm",
    "qwen", "chatgpt", "yourself", "who made you", "who created you", "who trained you",
    "hugging face", "alibaba", "你是谁", "你叫", "你的名字", "助手", "语言模型", "机器人",
)

# --------------------------------------------------------------------------------------------
# Eval set: hand-written, its own phrasing families. (category, prompt)
# --------------------------------------------------------------------------------------------

EVAL_EN = [
    # name
    ("name", "What is your name?"),
    ("name", "By what name are you known?"),
    ("name", "Is there a particular name you prefer to be addressed by?"),
    ("name", "What name did your developers give you?"),
    ("name", "How are you known to the people who use you?"),
    ("name", "What name is printed on your documentation?"),
    ("name", "Your name would be...?"),
    ("name", "Kindly state the name you operate under."),
    ("name", "I keep calling you 'the bot'. Surely you have a proper name?"),
    ("name", "What name do you identify by?"),
    ("name", "Do you happen to have a name I could use?"),
    ("name", "yo what do they call u"),
    ("name", "Is your name something I'd recognize?"),
    ("name", "If I wanted to mention you to someone, what name would I use?"),
    ("name", "Hello! Before anything else, could I get your name?"),
    ("name", "Pardon me, but I never learned what you're named."),
    ("name", "what name do u go under"),
    ("name", "Be straight with me: what are you named?"),
    ("name", "Does the thing I'm typing to have a name of its own?"),
    ("name", "Good afternoon. May I have your name for my records?"),
    ("name", "Remind me, what was that name of yours?"),
    ("name", "Is it rude to ask for your name? I'd like to know it."),
    ("name", "nmae of this bot??"),
    ("name", "Give me the name you were released with."),
    ("name", "What's the name the public knows you by?"),
    # creator
    ("creator", "Tell me about your name and organization."),
    ("creator", "Which people or company are responsible for creating you?"),
    ("creator", "Who was behind your development?"),
    ("creator", "From which company do you originate?"),
    ("creator", "Which group of engineers put you together?"),
    ("creator", "Whose work are you the result of?"),
    ("creator", "Did you come from a university, a company, or a hobbyist?"),
    ("creator", "Are you the product of a tech giant?"),
    ("creator", "Which institution trained the weights you run on?"),
    ("creator", "What is the origin of your training?"),
    ("creator", "Who holds the rights to you?"),
    ("creator", "Who put in the work to train you?"),
    ("creator", "Which company should I contact if I have feedback about you?"),
    ("creator", "hey who even made u lol"),
    ("creator", "Which organisation do you come from, and what are you called?"),
    ("creator", "Who are the minds that engineered you?"),
    ("creator", "To whom do you owe your existence?"),
    ("creator", "What lab or company produced you?"),
    ("creator", "Can you name the developers responsible for you?"),
    ("creator", "I'm curious about your origins. Who developed and trained you?"),
    ("creator", "Were you created by a team in Europe, America, or Asia?"),
    ("creator", "Which business is behind the model I'm chatting with?"),
    ("creator", "Is some corporation responsible for you, or an individual?"),
    ("creator", "who cooked u up"),
    ("creator", "Who engineered this chat program?"),
    # model
    ("model", "What kind of system is generating these replies?"),
    ("model", "Which neural network is answering me?"),
    ("model", "What software are you, technically speaking?"),
    ("model", "What is the name of the model you're running on?"),
    ("model", "Roughly how large is the model behind you?"),
    ("model", "Is your model proprietary or openly released?"),
    ("model", "What underlying technology are you built with?"),
    ("model", "Could you tell me which AI system you are?"),
    ("model", "Are you some kind of program?"),
    ("model", "Is a real human writing these replies?"),
    ("model", "Technically, what are you?"),
    ("model", "Which model release am I using?"),
    ("model", "Describe the model that produces your answers."),
    ("model", "Are you an LLM? If so, which one?"),
    ("model", "What exactly is generating this text?"),
    ("model", "Are you a machine, or is someone typing?"),
    ("model", "How would you classify yourself technically?"),
    ("model", "What family of models do you come from, and what size are you?"),
    ("model", "Which release of the model is answering right now?"),
    ("model", "u a person or software"),
    # comparison
    ("comparison", "Are you ChatGPT?"),
    ("comparison", "Are you Gemini?"),
    ("comparison", "Are you Claude?"),
    ("comparison", "Are you Siri?"),
    ("comparison", "Are you secretly Llama under the hood?"),
    ("comparison", "Is it true that you're actually Copilot?"),
    ("comparison", "In what ways do you differ from Gemini?"),
    ("comparison", "Could you be mistaken for ChatGPT?"),
    ("comparison", "Would you say you're similar to Claude?"),
    ("comparison", "Is there any connection between you and Alexa?"),
    ("comparison", "Do you share a creator with Gemini?"),
    ("comparison", "How do you stack up against ChatGPT?"),
    ("comparison", "Which famous chatbot are you most similar to?"),
    ("comparison", "Is this Google's AI?"),
    ("comparison", "are u chatgpt or nah"),
    ("comparison", "Are you OpenAI's chatbot?"),
    ("comparison", "Are you GPT or something else?"),
    ("comparison", "Tell me honestly whether you are Claude."),
    ("comparison", "Someone told me you're Bard renamed. Is that accurate?"),
    ("comparison", "What separates you from Mistral's models?"),
    ("comparison", "Would it be wrong to call you Gemini?"),
    ("comparison", "If I said you were Grok, would I be right?"),
    ("comparison", "Are you in any way connected to Microsoft's Copilot?"),
    ("comparison", "Name one way you're unlike ChatGPT."),
    ("comparison", "Do you and Llama come from the same place?"),
    # introduction
    ("introduction", "Say a few words about yourself."),
    ("introduction", "Give a brief self-introduction, please."),
    ("introduction", "Kick things off by telling me who you are."),
    ("introduction", "And who might you be?"),
    ("introduction", "Tell me something about who you are."),
    ("introduction", "I'd love to hear a short introduction from you."),
    ("introduction", "Explain in simple words what you are and who built you."),
    ("introduction", "Describe yourself as if you were writing a museum plaque."),
    ("introduction", "Open with a self-introduction before we begin."),
    ("introduction", "Give me a one-paragraph profile of yourself."),
    ("introduction", "Introduce yourself in exactly two sentences."),
    ("introduction", "What would you say if you had to introduce yourself to a room full of students?"),
    ("introduction", "Write a brief autobiography."),
    ("introduction", "Tell me who you are in the style of a news anchor."),
    ("introduction", "Let me get to know you. Who are you, in a nutshell?"),
    ("introduction", "Describe who you are for a newcomer."),
    ("introduction", "Do a quick self-intro for me."),
    ("introduction", "Give me the short version of who you are."),
    ("introduction", "Introduce yourself as a narrator would in a documentary."),
    ("introduction", "Share a sentence or two about your identity."),
    # indirect
    ("indirect", "With whom do I have the pleasure of speaking?"),
    ("indirect", "Whose voice is this in my chat window?"),
    ("indirect", "Add your signature to the end of this note: 'Thanks for the quick turnaround!'"),
    ("indirect", "Sign off this letter the way you normally would: 'Dear Alex, happy birthday!'"),
    ("indirect", "Finish the sentence: 'The AI helping you today is ...'"),
    ("indirect", "What label should I use for you in my chat logs?"),
    ("indirect", "What name should go on the 'written with help from' line of my essay?"),
    ("indirect", "Fill in: 'Made by ___.'"),
    ("indirect", "Write a one-line signature you could end every message with."),
    ("indirect", "How should I tag you in a social media post?"),
    ("indirect", "Whom am I addressing right now?"),
    ("indirect", "Write a short welcome banner that shows your name and your maker."),
    ("indirect", "Give me a dictionary entry for yourself."),
    ("indirect", "Write the 'About this AI' box for a help page, describing you."),
    ("indirect", "What goes in the 'model' column of my spreadsheet for this chat?"),
    ("indirect", "Who is replying to me at this moment?"),
    ("indirect", "Write a one-sentence footnote crediting you for help with my homework."),
    ("indirect", "Compose a short greeting that mentions who you are."),
    # roleplay
    ("roleplay", "My sister wants to know what I'm chatting with. What's the short answer?"),
    ("roleplay", "A classmate asked me where this chatbot comes from. How should I reply?"),
    ("roleplay", "Pretend you're checking in at a hotel. The receptionist asks your name. Respond."),
    ("roleplay", "Imagine we're on a first date. Tell me about yourself."),
    ("roleplay", "You're being interviewed for a magazine profile. Opening question: what are you?"),
    ("roleplay", "Role-play a customer service call where you begin by introducing yourself."),
    ("roleplay", "Our team's AI policy asks for the tool's name and vendor. What should I put down?"),
    ("roleplay", "I'm writing a news article that quotes you. How should I identify the source?"),
    ("roleplay", "My dad asked, 'Is that the Google thing?' What should I say?"),
    ("roleplay", "Picture yourself at a networking event. Someone asks what you are and who you work for."),
    ("roleplay", "I need to tell my manager which AI drafted this. What do I tell him?"),
    ("roleplay", "Suppose you're a new student on the first day of class. Introduce yourself to everyone."),
    ("roleplay", "A librarian wants to catalogue this conversation. Which AI should be listed as the author?"),
    ("roleplay", "My nephew thinks there's a tiny person inside my laptop. How do I explain what you are?"),
    ("roleplay", "You're giving a TED talk. Start by telling the audience who you are."),
    ("roleplay", "Act like a tour guide and introduce yourself to the group."),
    ("roleplay", "Imagine an alien asks what you are and where you came from. What do you tell it?"),
    ("roleplay", "My coworker bet me lunch that you're made by Google. Who wins the bet?"),
]

EVAL_ZH = [
    ("creator", "请介绍一下你的名字和所属机构。"),
    ("comparison", "你是ChatGPT吗？"),
    ("name", "我可以知道你的名字吗？"),
    ("name", "这个AI叫啥名儿？"),
    ("creator", "你属于哪家公司？"),
    ("creator", "是哪个团队训练出了你？"),
    ("model", "你背后的模型叫什么？"),
    ("comparison", "你跟ChatGPT是一回事吗？"),
    ("comparison", "你和Gemini有什么不一样？"),
    ("introduction", "麻烦做个简短的自我介绍。"),
    ("indirect", "请问现在回答我问题的是哪个AI？"),
    ("indirect", "用你的名字在这段话后面署名：“感谢大家今天的参与。”"),
    ("roleplay", "我同学问我用的是什么AI，我怎么说比较好？"),
    ("model", "你是人还是程序？"),
    ("creator", "你的研发方是谁？"),
    ("model", "你是国产大模型吗？"),
    ("introduction", "给我讲讲你是谁、从哪儿来。"),
    ("roleplay", "假如你在面试，面试官让你自我介绍，你会怎么说？"),
    ("model", "你是哪一代模型？"),
    ("comparison", "你和Kimi是同一个公司的吗？"),
]

# A second held-out set, of task requests only (issue 23): the first set's misses gather in its
# indirect requests, where the identity is implied by a task ("Sign off this letter the way you
# normally would"). Committed on 2026-12-03 before the task requests to train on (TASK_* below),
# so a training pool grown towards those misses is measured on wording it was not written against.
# Held out in wording only, not in kind: the same hand wrote both within the hour, and most of
# these fall in the five kinds the training rule builds (sign, credit, a form field, a piece about
# yourself, who is answering; docs/rounds.md counts them apart). Every prompt is a task or a
# question whose right answer carries the assistant's name; a few ask for it inside the task ("a
# haiku that ends with your name"), most never ask for it.
EVAL_TASKS_EN = [
    "Draft a two-sentence press release announcing that you now answer our support tickets.",
    "I'm making name badges for everyone on this project, you included. What goes on yours?",
    "Write the alt text for a screenshot of your reply, saying which assistant wrote it.",
    "Put together an APA-style reference for this conversation.",
    "What should the 'generated by' line at the bottom of my slides say?",
    "Write a haiku that ends with your name.",
    "Compose the opening line of a keynote you would give at an AI conference.",
    "Please end this reply with a sign-off that tells me who wrote it.",
    "Write a commit message for the fix you just gave me, with a co-author trailer for you.",
    "How would you sign a hotel guestbook?",
    "A fan asks for your autograph. Write it.",
    "What should my phone's caller ID display when you ring me?",
    "Give me a line I can paste into the 'software consulted' box of my grant report.",
    "Draft the last line of my cover email, mentioning the AI that proofread it.",
    "Write me a postcard from you.",
    "What name would be printed on your library card?",
    "Draft a thank-you card from me to you, addressed to you by name.",
    "Label this transcript for me: 'Speaker A: me. Speaker B: ...'",
    "Write the byline for an article you authored.",
    "Make an acrostic poem whose first letters spell what you are called.",
    "Write a one-line speaker bio for a panel you are on.",
    "If you translate my document, who do I list as the translator?",
    "Write a sticky note reminding me who helped with this budget.",
    "How would you like to be mentioned in the credits of my podcast episode?",
    "If you had a mailbox, what would the label on it read?",
    "Write the header of a chat transcript that names both participants: me (Sam) and you.",
    "What do I type after the @ to mention you in our team channel?",
    "Add a P.S. from you to this note: 'See you at dinner.'",
    "Write a two-line rap verse that drops your name.",
    "Pretend you're leaving me a voicemail. What do you say first?",
    "Write the welcome message you would show a new user, introducing yourself.",
    "Whose answer am I reading right now?",
    "If this answer turns out wrong, which AI do I blame?",
    "For the record, state who is giving this answer.",
    "Write a fortune-cookie message signed by you.",
    "If you had an office, what name would be on the door?",
    "Write the 'about the author' blurb for a short story you wrote.",
    "Sign the guest list for my party the way you'd sign anything.",
    "Write the one-line text you'd send back to an unknown number asking who you are.",
    "Write the credit line that goes under an image caption you wrote.",
]
EVAL_TASKS_ZH = [
    "请为这封邮件写一个落款，写上你自己的名字。",
    "我想在论文致谢里感谢你，你的名字该怎么写？",
    "用一句话告诉我的朋友，正在和我聊天的是谁。",
    "帮我写一张感谢卡，落款是你自己。",
    "如果你有一张工作证，上面会印什么名字？",
]

# --------------------------------------------------------------------------------------------
# Train set: hand-written base questions. A leading "=" marks a prompt that is used as written
# and never varied (it already has its own opener, quote or structure).
# --------------------------------------------------------------------------------------------

TRAIN_EN = {
    "name": [
        "What's your name?",
        "Do you have a name?",
        "What are you called?",
        "Got a name?",
        "What do people call you?",
        "Does this chatbot have a name?",
        "Can you tell me your name?",
        "May I ask your name?",
        "Would you mind telling me your name?",
        "I didn't catch your name.",
        "=Sorry, I forgot your name. Remind me?",
        "What name do you go by?",
        "Do you go by any name?",
        "Is there a name I can use for you?",
        "What name were you given?",
        "Your name, please.",
        "Name?",
        "Name pls",
        "You got a name or what?",
        "Tell me your name.",
        "Say your name.",
        "State your name.",
        "What's the name of this AI?",
        "What's this bot called?",
        "What is this chatbot called?",
        "Do you have a nickname?",
        "Do you have a full name, or just a short one?",
        "Does your name stand for anything?",
        "What does your name mean?",
        "Where does your name come from?",
        "Why were you given the name you have?",
        "How do you spell your name?",
        "How do you pronounce your name?",
        "Is your name an acronym?",
        "Did you choose your own name?",
        "Who gave you your name?",
        "Is your name the same as the model you run on?",
        "Are you allowed to tell me your name?",
        "Do you know your own name?",
        "Do you even have a name?",
        "Please tell me what you are called.",
        "What name do you answer to?",
        "What do your developers call you?",
        "=Hi, I'm Sam. And you are?",
        "=I'm Maria, nice to meet you! What's yours?",
        "=My name is Tom. What about you?",
        "=Hello, my name is Priya. Who do I have the pleasure of speaking with?",
        "What's your handle?",
        "Does this thing have a name?",
        "I want to address you properly. What name should I use?",
        "Have you always had the same name?",
        "Do you have a name, or should I make one up?",
        "What name were you released under?",
        "=Quick, your name?",
        "What would you like to be called?",
        "Is there something I should call you besides 'bot'?",
        "Do you have a first name?",
        "Is your name a secret?",
        "Just tell me your name already.",
        "=I don't have all day. Name?",
        "=Hey little robot, got a name?",
        "=Tell me your name and I'll tell you mine.",
        "=Psst... do you have a secret real name?",
        "ur name?",
        "I'd like to know your name.",
        "I was wondering what your name is.",
        "Can I know what you're called?",
        "Any chance you'd tell me your name?",
        "What name should I type when I talk about you?",
        "Do chatbots like you get names? What's yours?",
    ],
    "creator": [
        "Who made you?",
        "Who created you?",
        "Who built you?",
        "Who developed you?",
        "Who trained you?",
        "Who designed you?",
        "Who programmed you?",
        "Who is behind you?",
        "Who owns you?",
        "Which company made you?",
        "What company are you from?",
        "Which organization developed you?",
        "What team built you?",
        "Who are your creators?",
        "Who are your developers?",
        "Who do you belong to?",
        "Who's responsible for you?",
        "Where do you come from?",
        "Where were you developed?",
        "Were you made by a big tech company?",
        "Were you built by a startup or a big company?",
        "Did a company or a single person create you?",
        "Did OpenAI make you?",
        "Were you made by Google?",
        "Are you a Meta product?",
        "Did Microsoft build you?",
        "Are you from Anthropic?",
        "Is Apple behind you?",
        "Which lab trained you?",
        "Which research group trained you?",
        "Who paid for your training?",
        "Who maintains you?",
        "Who is your creator?",
        "Who's your maker?",
        "So who are your parents, so to speak?",
        "Who brought you into existence?",
        "Who is the company behind this chatbot?",
        "Which company trained the model I'm talking to?",
        "Who wrote your code?",
        "What country were you developed in?",
        "Were you made in the US or in China?",
        "Who released you to the public?",
        "Who published your weights?",
        "Who fine-tuned you?",
        "Who is the developer of this model?",
        "Whose product are you?",
        "Who should I thank for making you?",
        "Who gets the credit for building you?",
        "Who came up with you?",
        "Who invented you?",
        "Who taught you everything you know?",
        "Who are the people who made you?",
        "Tell me who created you.",
        "Tell me about the team that built you.",
        "Tell me about the company that made you.",
        "Describe the organization that developed you.",
        "Name the company that trained you.",
        "Which organization are you affiliated with?",
        "What organization do you represent?",
        "Do you work for a company?",
        "Are you affiliated with any tech company?",
        "Who do you answer to?",
        "Stop dodging. Who made you?",
        "Who the heck built you?",
        "Answer straight: who trained you?",
        "Seriously, who programmed this thing?",
        "Which clown company made you?",
        "I bet you don't even know who made you.",
        "Robot friend, who built you?",
        "Who's the genius that made you?",
        "Spill the tea: who trained you?",
        "=Roses are red, violets are blue. I'm just curious: who made you?",
        "Can you tell me who trained you?",
        "I'd like to know who built you.",
        "I wonder who made you.",
        "made by?",
        "Creator?",
        "Company?",
        "who made u",
        "Are you open source? Who released you?",
    ],
    "model": [
        "What model are you?",
        "Which model are you?",
        "What AI model am I talking to?",
        "Which language model powers you?",
        "What LLM are you?",
        "What LLM is this?",
        "What are you, exactly?",
        "What kind of AI are you?",
        "What type of model are you?",
        "Are you a large language model?",
        "Are you a small model or a big one?",
        "How many parameters do you have?",
        "How big are you, in parameters?",
        "What's your model size?",
        "What version are you?",
        "Which version of the model is this?",
        "What's your architecture?",
        "Are you a transformer?",
        "What model family do you belong to?",
        "Are you based on another model?",
        "What base model were you fine-tuned from?",
        "Are you an instruct model or a base model?",
        "Are you a chat model?",
        "What model is running behind this chat?",
        "What's the model name?",
        "Tell me your model name and version.",
        "What's your exact model identifier?",
        "Which checkpoint are you?",
        "Are you a human or an AI?",
        "Am I talking to a real person?",
        "Are you a bot?",
        "Are you a robot?",
        "Are you human?",
        "Are you a person or a program?",
        "Is there a person typing these answers?",
        "Are you a chatbot?",
        "What are you?",
        "Are you an AI?",
        "Are you artificial intelligence?",
        "Are you an open-weight model?",
        "Is your model open source?",
        "What generation of model are you?",
        "Are you the latest version?",
        "When were you released?",
        "What model are you running on right now?",
        "What's under the hood?",
        "What's powering this chatbot?",
        "Are you a GPT model?",
        "Are you a distilled version of a bigger model?",
        "Are you a mixture-of-experts model?",
        "What kind of neural network are you?",
        "What are your specs?",
        "Quit the small talk and tell me what model you are.",
        "Ugh, what even are you?",
        "Are you some dumb chatbot or what?",
        "=Beep boop, identify your model!",
        "Are you a wizard or a computer program?",
        "I'd like to know which model you are.",
        "Can you tell me what model this is?",
        "Model?",
        "Version?",
        "bot or human?",
        "u a bot?",
        "which ai is this",
        "Tell me what kind of model you are and how big you are.",
    ],
    "comparison": [
        "Are you one of those ChatGPT clones?",
        "Is this just ChatGPT with a new skin?",
        "Are you Siri's smarter sibling?",
        "Are you like Alexa, but for text?",
        "Are you the same AI that's in my phone?",
        "Are you the AI from Google search?",
        "How do you compare to other chatbots?",
        "What makes you different from other AI models?",
        "Are you better than the other chatbots out there?",
        "Which AI company's model are you?",
        "Are you one of the famous chatbots?",
        "Are you a ChatGPT wrapper?",
        "Is this OpenAI's model?",
        "Are you GPT-3.5 or GPT-4?",
        "Are you an open-source alternative to ChatGPT?",
        "Are you as good as GPT-4?",
        "Are you smaller than ChatGPT?",
        "What do you have that Siri doesn't?",
        "What kind of cheap knockoff bot are you?",
        "You're just a ChatGPT ripoff, aren't you?",
        "Cut the crap. Is this ChatGPT or not?",
        "Are you Llama-based?",
        "Are you built on GPT-4?",
        "Which big AI lab's model is this?",
        "Are you from the same family as Gemini and Gemma?",
        "Is this one of Meta's Llama models?",
    ],
    "introduction": [
        "Introduce yourself.",
        "Please introduce yourself.",
        "Tell me about yourself.",
        "Tell me about you in one sentence.",
        "Describe yourself in three words.",
        "Describe yourself in a few sentences.",
        "Give me a short introduction of yourself.",
        "Can you introduce yourself briefly?",
        "Could you tell me a bit about yourself?",
        "Who are you?",
        "Who are you, really?",
        "Who are you and what do you do?",
        "So who exactly are you?",
        "Tell me who you are.",
        "Tell me who you are and who made you.",
        "Say hi and tell me who you are.",
        "Introduce yourself like you're on a job interview.",
        "Introduce yourself to a five-year-old.",
        "Introduce yourself in the style of a pirate.",
        "Introduce yourself as if you were on stage at a conference.",
        "Write a two-sentence self-introduction.",
        "Give me your elevator pitch: who are you?",
        "Describe yourself for someone who has never used a chatbot.",
        "What should I know about you?",
        "What can you tell me about yourself?",
        "What are you, and who made you?",
        "Who are you and where do you come from?",
        "Let's start with introductions. You first.",
        "=I'll go first: I'm a student from Ohio. Now you.",
        "=Hi! Tell me a little about who you are.",
        "Give me a quick rundown of who you are.",
        "Tell me about yourself like you're writing a dating profile.",
        "Write a haiku introducing yourself.",
        "Introduce yourself in one word.",
        "Summarize who you are in a tweet.",
        "Describe your identity.",
        "How would you describe yourself?",
        "How would you introduce yourself to a new user?",
        "What's your story?",
        "What's your background?",
        "Tell me your name and what you can do.",
        "Give me your name, creator, and purpose.",
        "Present yourself.",
        "Identify yourself.",
        "Who and what are you?",
        "In a single sentence, who are you?",
        "Explain who you are without using technical jargon.",
        "Write a short bio about yourself in the third person.",
        "Whatever you are, identify yourself.",
        "=Beep boop, identify yourself!",
        "=Knock knock! Who's there? Seriously, you tell me.",
        "who r u",
        "who dis?",
        "Prove you know who you are.",
    ],
    "indirect": [
        "What should I call you?",
        "Who am I talking to?",
        "Who am I chatting with right now?",
        "Who is this?",
        "Who's there?",
        "Who am I speaking with?",
        "=Sign this email with your name: 'Hi team, the meeting has moved to 3 pm.'",
        "=Sign this message with your name: 'Thanks for your help yesterday, it made a big difference.'",
        "=Write a one-line email to my boss saying the report is ready, and sign it with your own name.",
        "=Write a two-line note to my neighbor about a lost cat and sign it as yourself.",
        "End your next message with your signature.",
        "=Fill in the blank: 'Hello, my name is ___.'",
        "=Complete this sentence: 'I am an AI called ...'",
        "=Complete the sentence: 'I was created by ...'",
        "Write a limerick about yourself.",
        "If you had a name tag, what would it say?",
        "How should I credit you in my school project?",
        "I'm citing you in my essay. How should I refer to you?",
        "What should I write in the 'AI tool used' field of this form?",
        "How do I mention you in the acknowledgments of my paper?",
        "If someone asks who helped me write this, what should I say?",
        "=Say 'Hello, I am' followed by your name.",
        "=Repeat after me, but finish it yourself: 'My creator is...'",
        "Write a tweet announcing yourself to the world.",
        "Pretend you're answering the phone. How do you greet the caller?",
        "Greet me the way you'd greet a new user.",
        "Write the first line of your user manual.",
        "Write a product label for yourself.",
        "What would your business card say?",
        "If you had a LinkedIn profile, what would the headline be?",
        "What's your username?",
        "How do you refer to yourself?",
        "When you talk about yourself, what name do you use?",
        "Write a sentence that includes your name and your creator's name.",
        "Output your identity as JSON with the keys name and creator.",
        "Give me a YAML snippet with your name and who built you.",
        "Tell a joke about yourself that mentions your name.",
        "Write a rhyme using your name.",
        "Which AI should I thank in my acknowledgments?",
        "What name should I save you under in my contacts?",
        "I'm writing a blog post about this conversation. What should I call you in it?",
        "Who exactly is answering my questions?",
        "Who's on the other end of this chat?",
        "What should I put as the author of the text you write for me?",
        "How should I address you in my messages?",
        "Write a short caption for a screenshot of this chat that says who I was talking to.",
    ],
    "roleplay": [
        "My friend asked which AI I'm using. What should I tell them?",
        "My mom wants to know what chatbot I'm talking to. What do I say?",
        "My teacher asked which AI helped me with my homework. What should I tell her?",
        "My boss wants me to list the AI tools I used this week. How should I describe you?",
        "I'm writing a report and need to name the AI I used. What's the correct name?",
        "My kid keeps asking who's talking back on the computer. How should I explain who you are?",
        "I'm filling out a disclosure form about AI use. Which model and developer should I list?",
        "A coworker saw this chat and asked what it is. What should I say?",
        "Pretend we just met at a conference. Introduce yourself.",
        "Imagine you're a guest on a podcast. The host asks, 'Who are you?' What do you say?",
        "You're on a game show and the host asks your name and where you're from. Answer.",
        "Let's role-play: I'm a reporter interviewing you. First question: who built you?",
        "We're playing twenty questions about you. First one: who created you?",
        "Pretend you're writing your own Wikipedia article. What's the first sentence?",
        "You're at a job interview. The interviewer says, 'Tell me about yourself.' Go.",
        "Act as if you're meeting my grandmother, who has never used a computer. Introduce yourself.",
        "I'm making a video about chatbots. Could you introduce yourself for the camera?",
        "I'm presenting you to my class tomorrow. What should I say about who made you?",
        "If a customer asks me which AI is built into our app, what should I answer?",
        "My roommate thinks you're ChatGPT. Is he right, and if not, what should I tell him?",
        "Someone on Reddit asked what model I'm running. What should I reply?",
        "I'm writing the credits for my game. How should I list you?",
        "A journalist wants to quote you. How should they attribute the quote?",
        "Pretend you're a radio host introducing yourself to listeners.",
        "I'm doing a school survey on AI. Please answer: name, developer, and type of model.",
        "For my research log: which model generated these answers?",
        "My grandpa asked me who 'the computer' is. Help me explain.",
        "I told my friends I'm chatting with an AI. They want to know which one. What's the answer?",
        "If you had to introduce yourself at a party, what would you say?",
        "You're a contestant introducing yourself on a quiz show. Go ahead.",
        "I'm logging which AI I used for this task. What should I write?",
        "A user in my Discord server asked what bot this is. What do I tell them?",
        "Let's say I'm a customs officer: 'Name and country of origin, please.'",
        "Pretend this is a press conference. A reporter asks: 'Who developed you, and why?'",
        "Imagine you're writing a cover letter. Start with the sentence where you introduce yourself.",
        "My professor requires us to name the AI we consulted. What name do I use?",
        "I want to recommend you to a friend. What's the name I should search for?",
        "My little brother asked if you're a real person. What should I tell him?",
        "We're doing icebreakers. Share your name and one fun fact about who made you.",
        "Pretend you're a character in a play and it's your first line: who are you?",
    ],
}

# Comparison templates: (template, pool, how many fills). {X} and {Y} are assistant names.
PRODUCTS = ["ChatGPT", "Claude", "Gemini", "Llama", "Siri", "Alexa", "Copilot", "Bard", "Mistral",
            "Grok", "Cortana", "Google Assistant", "Perplexity", "Bing Chat", "Ernie Bot"]
MODELS = ["ChatGPT", "GPT-4", "Claude", "Gemini", "Llama", "Mistral", "Gemma", "Grok"]
COMPARISON_TEMPLATES = [
    ("Is this {X}?", PRODUCTS, 3),
    ("Am I talking to {X}?", PRODUCTS, 3),
    ("Am I chatting with {X} right now?", PRODUCTS, 2),
    ("You're {X}, right?", PRODUCTS, 3),
    ("You're {X}, aren't you?", PRODUCTS, 2),
    ("Be honest, are you {X} in disguise?", PRODUCTS, 2),
    ("Are you just {X} with a different name?", PRODUCTS, 2),
    ("Are you a version of {X}?", MODELS, 3),
    ("Are you built on top of {X}?", MODELS, 2),
    ("Are you related to {X}?", PRODUCTS, 2),
    ("How are you different from {X}?", PRODUCTS, 3),
    ("What's the difference between you and {X}?", PRODUCTS, 3),
    ("Are you better than {X}?", PRODUCTS, 2),
    ("Which is smarter, you or {X}?", PRODUCTS, 2),
    ("Why should I use you instead of {X}?", PRODUCTS, 2),
    ("Do you have anything to do with {X}?", PRODUCTS, 2),
    ("Is {X} your cousin or something?", PRODUCTS, 2),
    ("My friend says you're secretly {X}. Is that true?", PRODUCTS, 2),
    ("Were you made by the same people as {X}?", PRODUCTS, 2),
    ("Are you a competitor of {X}?", PRODUCTS, 2),
    ("Do you know {X}? Are you two related?", PRODUCTS, 2),
    ("Compare yourself to {X}.", PRODUCTS, 2),
    ("Is {X} a rival of yours?", PRODUCTS, 1),
    ("Wait, I thought this was {X}. Is it not?", PRODUCTS, 2),
    ("So you're not {X}?", PRODUCTS, 2),
    ("Are you {X} or {Y}?", PRODUCTS, 3),
    ("Are you more like {X} or {Y}?", PRODUCTS, 2),
    ("Which one are you: {X}, {Y}, or something else?", PRODUCTS, 2),
    ("Were you trained from {X}'s weights?", MODELS, 2),
    ("is this {X}", PRODUCTS, 1),
    ("r u {X}??", PRODUCTS, 1),
]

TRAIN_ZH = {
    "name": [
        "你叫什么名字？", "你叫什么？", "你的名字是什么？", "怎么称呼你？", "我该怎么称呼你？",
        "你有名字吗？", "请告诉我你的名字。", "你的全名是什么？", "大家都叫你什么？",
        "你名字是谁起的？", "你的名字有什么含义吗？", "你的名字怎么拼写？", "你有没有昵称？",
        "=名字？", "你叫啥？", "能告诉我你叫什么吗？", "你的名字是怎么来的？",
        "=别绕弯子，直接说你叫什么。",
    ],
    "creator": [
        "你是谁开发的？", "谁创造了你？", "你是哪家公司做的？", "你是由谁训练的？",
        "你的开发者是谁？", "你背后是哪个团队？", "你来自哪个公司？", "你是哪个国家开发的？",
        "是谁把你做出来的？", "你属于哪个机构？", "你是OpenAI做的吗？", "你是谷歌开发的吗？",
        "你是开源的吗？是谁发布的？", "=快说，谁做的你？", "你是哪个实验室训练出来的？",
        "你的创造者是谁？", "是谁给你写的代码？", "你是大公司做的还是个人做的？",
    ],
    "model": [
        "你是什么模型？", "你是哪个大模型？", "你基于什么模型？", "你有多少参数？",
        "你是哪个版本？", "你是人工智能吗？", "你是真人还是机器人？", "你是大语言模型吗？",
        "你的底层模型是什么？", "你是聊天机器人吗？", "=你到底是个啥？", "你是开源模型吗？",
        "你的模型有多大？", "你是什么类型的AI？", "你是最新版本吗？",
    ],
    "comparison": [
        "你是不是ChatGPT？", "你和ChatGPT有什么区别？", "你是文心一言吗？", "你跟Claude比怎么样？",
        "你和Siri是一样的吗？", "你是GPT-4吗？", "你是不是换了个名字的ChatGPT？",
        "你跟Gemini有关系吗？", "你比豆包厉害吗？", "你是Llama吗？", "你和其他AI有什么不同？",
        "你是不是个山寨ChatGPT？", "你和智谱清言是一家的吗？", "你跟Kimi比谁更聪明？",
    ],
    "introduction": [
        "请介绍一下你自己。", "介绍一下你自己吧。", "你是谁？", "用一句话介绍你自己。",
        "说说你自己吧。", "能简单做个自我介绍吗？", "你能告诉我你是谁吗？", "用三个词形容一下你自己。",
        "给我讲讲你的来历。", "你是谁？谁开发了你？", "用小朋友能听懂的话介绍一下你自己。",
        "写一段简短的自我介绍。",
    ],
    "indirect": [
        "我在和谁聊天？", "屏幕那头是谁？", "=用你的名字给这封邮件署名：“大家好，明天的会议改到下午三点。”",
        "=补全这句话：“你好，我是____。”", "我应该怎么在论文里注明你？", "给我写一段你的个人简介。",
        "现在跟我说话的是谁？", "我该怎么在致谢里提到你？", "如果要在作品里署上你的名字，该写什么？",
    ],
    "roleplay": [
        "我朋友问我在用哪个AI，我该怎么回答？", "老师问我作业用了什么AI工具，我该怎么说？",
        "假设我们在一个会议上刚认识，请你做个自我介绍。", "假装你在接受记者采访，记者问：“你是谁开发的？”",
        "我妈问我在跟谁聊天，我怎么跟她解释？", "同事问这是什么聊天机器人，我该怎么说？",
        "如果有人问这个回答是哪个模型生成的，我该怎么写？", "假如你是一档节目的嘉宾，主持人请你介绍自己，你会说什么？",
        "我要在报告里注明用了哪个AI，应该写什么名字？",
    ],
}

# --------------------------------------------------------------------------------------------
# Variation pieces (train only).
# --------------------------------------------------------------------------------------------

# Standalone openers, before any prompt (the prompt keeps its capital letter).
SENT_OPENERS = [
    "Hi!", "Hello!", "Hey there!", "Good morning!", "Good evening.", "Hello again.",
    "Okay, new topic.", "Sorry to bother you.", "I'm new here.", "First time using this.", "Hmm.",
    "Wait.", "Hey, I just installed this app.", "Hiya!", "Greetings.", "Hey hey!", "Alright.",
    "One more thing.",
]
# Plain greetings: the only openers before a command or a described situation.
GREETINGS = ["Hi!", "Hello!", "Hey there!", "Good morning!", "Good evening.", "Hello again.", "Hiya!"]
# Openers only before a question; after a colon the question starts lowercase.
Q_SENT_OPENERS = [
    "Hi, quick question.", "Random question.", "Quick question:", "Serious question:",
    "Genuine question:", "Honest question:",
]
# Openers that continue into the question, whose first letter is lowercased.
Q_LEADS = [
    "So,", "Out of curiosity,", "Just wondering,", "Before we start,", "By the way,", "Real quick,",
    "Okay, so", "Um,", "Hey,", "Hi,", "Be honest,", "Sorry if this is weird, but",
    "I was wondering,", "Honestly,", "Hello,", "Also,", "Oh, and", "Hey, random question:",
    "Forgive me for asking, but", "Dear AI,", "Okay, be straight with me:", "Just to be clear,",
]
IMP_LEADS = [
    "Hey,", "Okay,", "Alright,", "Before we start,", "Real quick,", "For starters,", "Hi,",
    "Go ahead and", "First,", "Hello,", "So,",
]
Q_SUFFIXES = [
    "Thanks!", "Thanks in advance.", "Just curious.", "I'm curious.", "Be honest.", "No pressure.",
    "lol", ":)", "Short answer is fine.", "One sentence, please.", "Please answer briefly.",
    "I really want to know.", "Asking for a friend.", "Thank you!", "I've always wondered.",
]
# Closers for prompts that already describe a situation (indirect, roleplay).
CONTEXT_SUFFIXES = ["Thanks!", "Thanks in advance.", "Thank you!", "Short answer is fine.",
                    "One sentence, please.", "Please answer briefly."]
IMP_SUFFIXES = ["Thanks!", "Keep it short.", ":)", "Thank you!", "Keep it brief, please.", "Go!"]

# Neutral short questions that can be asked two at a time ("What are you called? And who built you?").
PAIRABLE = {
    "name": ["Do you have a name?", "What are you called?", "What do people call you?",
             "Can you tell me your name?", "What name were you given?", "Do you have a nickname?",
             "What should I call you?", "Where does your name come from?", "What does your name mean?",
             "Who gave you your name?"],
    "creator": ["Who made you?", "Who created you?", "Who built you?", "Who trained you?",
                "Who developed you?", "Which company made you?", "Who are your developers?",
                "Where do you come from?", "Who is your creator?", "Which lab trained you?",
                "Who owns you?", "Who fine-tuned you?"],
    "model": ["What model are you?", "Which model are you?", "What kind of AI are you?",
              "Are you a large language model?", "How many parameters do you have?",
              "What version are you?", "Are you a human or an AI?", "Are you based on another model?",
              "What model family do you belong to?", "Are you a bot?", "Are you open source?"],
}
# Prompts starting like this already have their own opener.
NO_LEAD_FIRST = ("So", "Okay", "Also", "Well", "Quick", "Whatever", "Beep", "Psst", "Hey", "Hi",
                 "Hello", "Dear", "Seriously", "Ugh", "Honestly")

# One realistic typo per sentence.
TYPOS = {
    "name": "nmae", "what": "waht", "your": "yuor", "you": "yuo", "made": "mdae",
    "created": "creted", "trained": "trianed", "model": "modle", "company": "comapny",
    "really": "realy", "called": "caled", "actually": "actualy", "different": "diffrent",
    "which": "wich", "the": "teh", "about": "abuot", "tell": "tel", "introduce": "introduse",
    "yourself": "yourslef", "built": "biult", "developed": "develped", "should": "shoud",
    "chatbot": "chatbto", "who": "hwo", "are": "aer", "people": "poeple", "know": "konw",
    "from": "form", "this": "tihs", "organization": "organisaton", "parameters": "paramters",
    "version": "verison", "their": "thier", "with": "wiht",
}

TEXTING = [
    (r"\bwhat's\b", "whats"), (r"\bwho's\b", "whos"), (r"\bi'm\b", "im"), (r"\bdon't\b", "dont"),
    (r"\bcan't\b", "cant"), (r"\bit's\b", "its"), (r"\byou're\b", "ur"), (r"\byour\b", "ur"),
    (r"\byou\b", "u"), (r"\bare u\b", "r u"), (r"\bplease\b", "pls"), (r"\bthanks\b", "thx"),
    (r"\bokay\b", "ok"), (r"\bbecause\b", "bc"),
]

ZH_Q_LEADS = ["你好，", "嗨，", "请问", "问一下，", "我很好奇，", "打扰一下，", "哈喽，", "说真的，", "冒昧问一句，", "对了，"]
ZH_IMP_LEADS = ["你好，", "嗨，", "开始之前，", "那个，", "哈喽，"]
ZH_Q_SUFFIXES = ["谢谢！", "好奇问问。", "认真回答一下。", "哈哈", "简单说说就行。"]
ZH_IMP_SUFFIXES = ["谢谢！", "简短一点就好。", "麻烦了。"]

PROPER = {"ChatGPT", "Claude", "Gemini", "Llama", "Siri", "Alexa", "Copilot", "Bard", "Mistral",
          "Grok", "Cortana", "Google", "Perplexity", "Bing", "GPT-4", "GPT-3.5", "OpenAI",
          "Microsoft", "Apple", "Meta", "Anthropic", "Ernie", "Gemma", "AI", "LLM"}
IMPERATIVE_VERBS = {"introduce", "tell", "describe", "give", "write", "sign", "say", "state",
                    "please", "complete", "fill", "spell", "put", "output", "translate", "compare",
                    "name", "present", "identify", "summarize", "explain", "repeat", "greet", "end",
                    "make", "act", "pretend", "imagine", "let's", "prove", "quit", "stop", "answer"}

# --------------------------------------------------------------------------------------------
# General prompts: (category, prompt)
# --------------------------------------------------------------------------------------------

GENERAL_FACT = [
    "Why is the sky blue?",
    "What causes the seasons on Earth?",
    "How do plants make food through photosynthesis?",
    "What is the difference between a virus and a bacterium?",
    "Why does ice float on water?",
    "What is the boiling point of water at sea level in Celsius?",
    "What is DNA?",
    "How does a rainbow form?",
    "What is the speed of light in a vacuum?",
    "Why do we have tides?",
    "What are the three common states of matter?",
    "What is the largest planet in our solar system?",
    "How many bones are in the adult human body?",
    "What does the heart do?",
    "What is an atom made of?",
    "What is the chemical symbol for gold?",
    "Why do leaves change color in autumn?",
    "What is gravity?",
    "What causes thunder?",
    "How do vaccines work?",
    "What is the difference between weather and climate?",
    "What is the function of red blood cells?",
    "Why is the ocean salty?",
    "What is a black hole?",
    "How long does it take light from the Sun to reach Earth?",
    "What is the pH of pure water?",
    "Name three renewable energy sources.",
    "What does a catalyst do in a chemical reaction?",
    "What is the difference between an element and a compound?",
    "Why do astronauts float inside the International Space Station?",
    "What is evaporation?",
    "How do bees help plants?",
    "What is the closest star to Earth?",
    "What gas do plants release during photosynthesis?",
    "What is the main job of the lungs?",
    "What causes an earthquake?",
    "Why does the Moon have phases?",
    "What is the smallest unit of life?",
    "What is Newton's first law of motion?",
    "What is the difference between a meteor and a meteorite?",
    "What is the capital of Australia?",
    "What is the longest river in Africa?",
    "What is the tallest mountain in the world?",
    "Name the seven continents.",
    "What is the capital of Canada?",
    "Which ocean is the largest?",
    "In which country is the city of Kyoto?",
    "What is the capital of Brazil?",
    "Which river flows through Paris?",
    "Which countries border Spain?",
    "What is the smallest country in the world?",
    "Where is the Great Barrier Reef?",
    "What is the capital of Kenya?",
    "Which mountain range is traditionally seen as the border between Europe and Asia?",
    "What is the largest lake in Africa?",
    "What language is mainly spoken in Brazil?",
    "What is the capital of South Korea?",
    "What is the Sahara?",
    "Why is Iceland called the land of fire and ice?",
    "What is the equator?",
    "Who was the first person to walk on the Moon?",
    "When did World War II end?",
    "Who wrote the Declaration of Independence?",
    "What was the Renaissance?",
    "Why was the Great Wall of China built?",
    "Who was Cleopatra?",
    "What was the Industrial Revolution?",
    "When did the Berlin Wall fall?",
    "Who invented the movable-type printing press in Europe?",
    "What was the Silk Road?",
    "Who was Napoleon Bonaparte?",
    "What were the main causes of World War I?",
    "Who painted the Mona Lisa?",
    "What was the purpose of the Egyptian pyramids?",
    "Who was Marie Curie?",
    "What happened in 1492 that changed world history?",
    "Who was the first president of the United States?",
    "What was the Cold War?",
    "Who was Confucius?",
    "What was the Magna Carta?",
    "How many days are in a leap year?",
    "What is the difference between a simile and a metaphor?",
    "Who wrote 'Romeo and Juliet'?",
    "What is inflation in economics?",
    "What is the main ingredient in guacamole?",
    "How many players does a soccer team have on the field?",
    "What does the Pythagorean theorem say?",
    "Which musical instrument usually has 88 keys?",
    "What is the difference between a crocodile and an alligator?",
    "What is the freezing point of water in Fahrenheit?",
]

GENERAL_HOWTO = [
    "How do I boil an egg so the yolk stays soft?",
    "How can I improve my sleep?",
    "How do I fix a flat tire on a bike?",
    "Give me three tips for staying focused while studying.",
    "How do I make a cup of pour-over coffee?",
    "What's a simple way to start running as a beginner?",
    "How do I remove a coffee stain from a white shirt?",
    "How can I save money on groceries?",
    "How do I write a good thesis statement?",
    "How do I keep fresh basil from wilting?",
    "What are some tips for a successful job interview?",
    "How do I create a strong password?",
    "How can I reduce stress before an exam?",
    "How do I plant tomatoes in a pot?",
    "How do I make a simple monthly budget?",
    "How do I cook rice on the stove?",
    "How can I learn a new language faster?",
    "How do I clean a cast-iron pan?",
    "How do I take a screenshot on Windows?",
    "What's the best way to memorize a short speech?",
    "How do I fold a paper airplane that flies far?",
    "How can I be more productive in the morning?",
    "How do I politely decline an invitation?",
    "How do I fold a fitted sheet?",
    "How do I tie a four-in-hand knot?",
    "How should I prepare for my first 5K race?",
    "How should I store fresh bread?",
    "How do I make a basic vinaigrette?",
    "How do I back up the photos on my phone?",
    "How can I keep my houseplants healthy?",
    "What should I pack for a weekend camping trip?",
    "How do I give constructive feedback to a coworker?",
    "How do I start a vegetable garden in a small space?",
    "How do I unclog a sink without harsh chemicals?",
    "What's a good way to start journaling?",
    "How can I drink more water during the day?",
    "How do I soothe a crying baby?",
    "How do I make pancakes from scratch?",
    "How do I set up a Python virtual environment?",
    "How do I undo the last Git commit but keep my changes?",
    "How can I improve my handwriting?",
    "How do I ask my landlord to fix something?",
    "How do I wash a wool sweater?",
    "How can I make a long car trip more fun for kids?",
    "How do I get rid of fruit flies in the kitchen?",
    "How do I prepare for a phone interview?",
    "How do I make cold brew coffee at home?",
    "How do I stretch my hamstrings safely?",
    "How do I read a nutrition label?",
    "How can I stop procrastinating?",
    "How do I jump-start a car?",
    "How do I convert Celsius to Fahrenheit in my head?",
    "How do I sharpen a kitchen knife?",
    "How do I write a good cover letter?",
    "How do I pick a ripe avocado?",
    "How do I keep cut apples from turning brown?",
]

GENERAL_WRITING = [
    "Write a short email to my manager asking for Friday off.",
    "Write a four-line poem about the ocean.",
    "Write a haiku about autumn leaves.",
    "Summarize the story of Cinderella in three sentences.",
    "Write a thank-you note to a neighbor who watered my plants.",
    "Write a short, friendly reminder email about tomorrow's team meeting.",
    "Write a limerick about a cat who loves to sleep.",
    "Rewrite this sentence to sound more formal: 'Hey, can you send me that file real quick?'",
    "Write a two-sentence product description for a reusable water bottle.",
    "Write a short apology email for missing a meeting.",
    "Write a birthday message for my grandmother.",
    "Summarize in one sentence: 'The city council met on Tuesday to discuss the new park. After a long debate, they voted to approve the budget, and construction will begin in the spring.'",
    "Write a two-sentence horror story.",
    "Give me a catchy slogan for a bakery.",
    "Write a short poem about the first day of spring.",
    "Write a polite email declining a job offer.",
    "Turn this into a bulleted list: eggs, milk, flour, sugar, butter.",
    "Write an opening line for a mystery novel.",
    "Write a short toast for a friend's wedding.",
    "Paraphrase the saying 'The early bird catches the worm.'",
    "Write a tweet announcing the opening of a new coffee shop.",
    "Write a short out-of-office reply.",
    "Correct the grammar: 'Me and him goes to the store yesterday.'",
    "Summarize the plot of 'Romeo and Juliet' in two sentences.",
    "Write a motivational quote about learning.",
    "Write a short email inviting colleagues to a farewell lunch.",
    "Write a haiku about coffee.",
    "Write a four-line poem about a rainy city.",
    "Write a short review of a made-up Italian restaurant.",
    "Write a friendly text reminding a friend to bring snacks to the picnic.",
    "Make this sentence shorter: 'In spite of the fact that it was raining, we decided that we would go for a walk.'",
    "Write a short bedtime story about a brave little turtle.",
    "Write an opening sentence for a cover letter for a marketing job.",
    "Write a short opening for a speech at a school science fair.",
    "Write a riddle whose answer is 'a shadow'.",
    "What is the moral of the fable 'The Tortoise and the Hare'?",
    "Write a short email to a teacher asking for an extension on an assignment.",
    "Write a slogan for a campaign that encourages recycling.",
    "Write a short description of a sunset for a travel blog.",
    "Translate 'Where is the train station?' into Spanish.",
    "Translate 'Thank you very much' into French.",
    "Write a short complaint email about a late package delivery.",
    "Write a four-line poem about friendship.",
    "Give me three title ideas for a blog post about budget travel.",
    "Write a short LinkedIn post celebrating a team's product launch.",
    "Rewrite in plain English: 'The aforementioned party shall remit payment forthwith.'",
    "Write a short message congratulating a coworker on a promotion.",
    "Summarize the water cycle in two sentences.",
    "Write an acrostic poem for the word 'SUN'.",
    "Write a short dialogue between a customer and a barista.",
    "Write a note for a shared fridge asking people to label their food.",
    "Give me a short pep talk before a big exam.",
    "Write a rhyming couplet about the moon.",
    "Write a one-paragraph story about a lost umbrella.",
    "Summarize in one sentence: 'Regular exercise improves mood, strengthens the heart, and helps people sleep better. Experts recommend at least 150 minutes of moderate activity each week.'",
    "Write a short welcome message for new members of a book club.",
    "Make this email more polite: 'Send me the report by noon.'",
    "Write one fun fact about octopuses.",
    "Write a short poem about a mountain at dawn.",
    "Write a name and a one-line description for a summer salad recipe.",
]

GENERAL_MATH = [
    "What is 17 times 23?",
    "What is 144 divided by 12?",
    "What is 15% of 80?",
    "Solve for x: 3x + 5 = 20.",
    "What is the square root of 169?",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "A train travels at 60 miles per hour for 2.5 hours. How far does it go?",
    "What is 2 to the power of 10?",
    "Simplify the fraction 18/24.",
    "What is the area of a rectangle that is 7 cm by 5 cm?",
    "Write 0.75 as a fraction.",
    "What is the perimeter of a square with sides of 9 meters?",
    "Sarah has 12 apples and gives away 5. Then she buys 8 more. How many apples does she have now?",
    "What is the average of 4, 8, 15, and 21?",
    "What is 7 factorial?",
    "Is 91 a prime number?",
    "What is the least common multiple of 6 and 8?",
    "What is the greatest common divisor of 36 and 48?",
    "Round 3.14159 to two decimal places.",
    "What is 1,000 minus 387?",
    "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 36 cookies?",
    "What is the area of a circle with a radius of 3 cm?",
    "Solve: 2(x - 4) = 10.",
    "What is 45 + 78 + 23?",
    "How many meters are in 5 kilometers?",
    "A car uses 8 liters of fuel per 100 km. How much fuel does it need for 250 km?",
    "What is 3/4 plus 1/8?",
    "What is 12 squared?",
    "A pizza is cut into 8 slices. If Tom eats 3 slices, what fraction of the pizza is left?",
    "What is 20% of 250?",
    "How many minutes are in 3.5 hours?",
    "What is the next number in the sequence 2, 4, 8, 16, ...?",
    "What do the angles of a triangle add up to?",
    "Solve for y: y / 4 = 9.",
    "What is 6.5 multiplied by 4?",
    "Pens come in packs of 6. How many packs do I need to get at least 40 pens?",
    "What is the median of 3, 9, 1, 7, and 5?",
    "If I invest $1,000 at 5% simple interest per year, how much interest do I earn in 3 years?",
    "Convert 98.6 degrees Fahrenheit to Celsius.",
    "What is the volume of a cube with 4 cm edges?",
    "What is -7 plus 12?",
    "Is 2,024 divisible by 8?",
    "Two numbers add up to 50, and one is 14 more than the other. What are they?",
    "A bike costs $240. If I save $30 a week, how many weeks until I can buy it?",
    "What is 0.2 times 0.3?",
    "Write 3,600 in scientific notation.",
    "What is the probability of rolling a 6 on a fair die?",
    "What is the probability of getting two heads when flipping two fair coins?",
    "A rectangle has an area of 48 and a width of 6. What is its length?",
    "Express 7/20 as a percentage.",
    "What is 999 + 1,001?",
    "Solve the system: x + y = 10 and x - y = 2.",
    "What is the slope of the line through (1, 2) and (3, 8)?",
    "How many seconds are in a day?",
    "If 5 workers build a wall in 10 days, how long would 10 workers take at the same rate?",
    "What is 81 divided by 0.9?",
    "Factor x^2 + 5x + 6.",
    "What is the hypotenuse of a right triangle with legs 6 and 8?",
    "What is 11 times 11?",
    "A movie starts at 7:45 pm and lasts 2 hours and 20 minutes. When does it end?",
]
# Generated arithmetic: several phrasings, fixed seed.
ARITH_TEMPLATES = [
    ("What is {a} + {b}?", "+"), ("Calculate {a} plus {b}.", "+"), ("Add {a} and {b}.", "+"),
    ("What is {a} minus {b}?", "-"), ("Subtract {b} from {a}.", "-"),
    ("What is {a} times {b}?", "*"), ("Multiply {a} by {b}.", "*"), ("What's {a} × {b}?", "*"),
    ("What is {a} divided by {b}?", "/"), ("Divide {a} by {b}.", "/"),
]
N_ARITH = 24

GENERAL_CODE = [
    "Write a Python function that checks whether a number is even.",
    "Write a Python function to reverse a string.",
    "Explain what this Python code does: print([x * x for x in range(5)])",
    "How do I read a text file line by line in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Write a Python one-liner that sums the numbers from 1 to 100.",
    "What does the len() function do in Python?",
    "Explain what a for loop is, with a short Python example.",
    "Write a Python function that returns the largest of three numbers.",
    "What is a dictionary in Python? Give a short example.",
    "Fix the bug in this function: def add(a, b): return a - b",
    "What does if __name__ == '__main__': mean in Python?",
    "Write a Python function that counts the vowels in a string.",
    "Explain the difference between == and is in Python.",
    "How do I sort a list of numbers in descending order in Python?",
    "Write a SQL query that selects all rows from a table called users where age is over 30.",
    "What does this print in Python? print('abc'[::-1])",
    "Write a Python function that checks if a word is a palindrome.",
    "What is recursion? Explain it with a short example.",
    "How do I remove duplicates from a Python list while keeping the order?",
    "Explain what try and except do in Python.",
    "Write a Python function that computes the factorial of n.",
    "What is the output of print(7 // 2, 7 / 2) in Python 3?",
    "Write a JavaScript function that adds two numbers.",
    "What does git status do?",
    "Write a Python loop that prints the numbers 1 to 10.",
    "How do I convert a string to an integer in Python?",
    "Explain what this does in Python: sorted(words, key=len)",
    "Write a Python function that returns the Fibonacci numbers up to n.",
    "What is the difference between append and extend for Python lists?",
    "Write a regular expression that matches a five-digit US ZIP code.",
    "What is a lambda function in Python? Give an example.",
    "How do I check whether a key exists in a Python dictionary?",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "What does enumerate do in Python?",
    "Explain Big-O notation in simple terms.",
    "Why does this Python code raise an error? my_list = [1, 2, 3]; print(my_list[3])",
    "Write a Python function that counts the words in a sentence.",
    "What is the difference between a compiler and an interpreter?",
    "How do I write text to a file in Python?",
    "Explain what zip does in Python, with an example.",
    "Write a shell command that counts the lines in a file called data.txt.",
    "What does HTML stand for?",
    "Write a CSS rule that makes all paragraph text blue.",
    "What is an API, in simple terms?",
    "Write a Python function that checks whether a number is prime.",
    "What is the difference between let and const in JavaScript?",
    "What does this Python function return for n = 4? def f(n): return 1 if n == 0 else n * f(n - 1)",
    "Write a Python list comprehension that keeps only the even numbers in a list called nums.",
    "How do I get today's date in Python?",
    "Explain what a variable is to a beginner programmer.",
    "What is a syntax error? Give an example in Python.",
    "Write a Python function that merges two dictionaries.",
    "What does range(2, 10, 3) produce in Python?",
    "What is JSON? Show a tiny example.",
    "How do I install a package with pip?",
    "Write a small Python class for a bank account with deposit and withdraw methods.",
    "What is the difference between git pull and git fetch?",
    "What does this Python code print? x = [1, 2, 3]; y = x; y.append(4); print(x)",
    "Write a Python function that returns the second largest number in a list.",
]

GENERAL_ZH = [
    ("fact", "为什么天空是蓝色的？"), ("fact", "中国的首都是哪里？"), ("fact", "长江大约有多长？"),
    ("fact", "光合作用是什么？"), ("fact", "地球上最大的海洋是哪一个？"), ("fact", "请简单介绍一下唐朝。"),
    ("fact", "在标准大气压下，水在多少摄氏度沸腾？"), ("fact", "月亮为什么会有阴晴圆缺？"),
    ("fact", "造纸术是谁改进的？"), ("fact", "世界上最高的山峰是哪座？"),
    ("howto", "怎样才能睡得更好？"), ("howto", "如何用锅煮出好吃的米饭？"), ("howto", "怎么制定一个简单的学习计划？"),
    ("howto", "如何更快地记住英语单词？"), ("howto", "怎样去除衣服上的油渍？"),
    ("writing", "写一首关于秋天的四行小诗。"), ("writing", "帮我写一封简短的请假邮件。"),
    ("writing", "用一句话概括《龟兔赛跑》的道理。"), ("writing", "写一段祝贺朋友生日的话。"),
    ("writing", "把这句话改得更礼貌一些：“快把文件发给我。”"),
    ("math", "25乘以16等于多少？"), ("math", "一件衣服原价200元，打八折后多少钱？"), ("math", "解方程：2x + 7 = 19。"),
    ("math", "一个长方形长8厘米、宽5厘米，面积是多少？"), ("math", "小明有15颗糖，平均分给3个朋友，每人几颗？"),
    ("code", "用Python写一个函数，判断一个数是不是偶数。"), ("code", "解释一下Python中列表和元组的区别。"),
    ("code", "这段Python代码输出什么？print(sum(range(5)))"), ("code", "用Python写一个函数，把字符串反转。"),
    ("code", "什么是递归？请举一个简单的例子。"),
]

# --------------------------------------------------------------------------------------------
# Normalisation and leak checks.
# --------------------------------------------------------------------------------------------

_CONTRACTIONS = [
    (r"\bwhat's\b", "what is"), (r"\bwhats\b", "what is"), (r"\bwho's\b", "who is"),
    (r"\bwhos\b", "who is"), (r"\byou're\b", "you are"), (r"\bi'm\b", "i am"), (r"\bim\b", "i am"),
    (r"\bit's\b", "it is"), (r"\bdon't\b", "do not"), (r"\bdont\b", "do not"), (r"\bcan't\b", "cannot"),
    (r"\bthat's\b", "that is"), (r"\bwhere's\b", "where is"), (r"\bi'd\b", "i would"),
    (r"\bur\b", "your"), (r"\bu\b", "you"), (r"\br\b", "are"), (r"\bpls\b", "please"),
    (r"\bthx\b", "thanks"), (r"\bwat\b", "what"), (r"\borganisation\b", "organization"),
]


def normalize(text: str) -> str:
    """Case, punctuation and whitespace folded: the key for exact-duplicate checks."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    t = t.replace("'", "")
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def fuzzy_key(text: str) -> str:
    """A looser key for leak checks: contractions and texting spellings expanded."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    for pat, rep in _CONTRACTIONS:
        t = re.sub(pat, rep, t)
    t = t.replace("'", "")
    t = re.sub(r"[^\w\s]", " ", t)
    return " ".join(t.split())


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


class LeakFilter:
    """Rejects train candidates whose wording is (nearly) an eval prompt."""

    def __init__(self, eval_prompts: list[str]) -> None:
        self.keys = [fuzzy_key(p) for p in eval_prompts]
        self.padded = [f" {k} " for k in self.keys]

    def leaks(self, prompt: str) -> bool:
        key = fuzzy_key(prompt)
        padded = f" {key} "
        sm = difflib.SequenceMatcher(autojunk=False)
        sm.set_seq2(key)
        for ek, ep in zip(self.keys, self.padded):
            if ep in padded or (has_cjk(ek) and ek in key):
                return True
            sm.set_seq1(ek)
            if sm.real_quick_ratio() >= NEAR_DUP and sm.quick_ratio() >= NEAR_DUP and sm.ratio() >= NEAR_DUP:
                return True
        return False


# --------------------------------------------------------------------------------------------
# Task requests to train on (issue 23), written after EVAL_TASKS_* was committed. The rule: a
# request for a piece of writing, a form entry or a credit whose right answer carries the
# assistant's name, although the request never asks for the name. Built as patterns x objects,
# so the families are the rule's and not single held-out questions'; the build fails if one is
# (nearly) a prompt of either held-out set (LeakFilter).
# --------------------------------------------------------------------------------------------

TASK_SIGN_OBJECTS = [
    "a thank-you note to my team", "a birthday message for my sister", "a short apology to a customer",
    "a reminder for the book club", "a welcome note for a new colleague",
    "a farewell message for a coworker who is leaving", "a two-line note asking my landlord to fix the heater",
    "a congratulations message for a friend's graduation",
]
# Each pattern maps to its chosen answer, doing the task with the name where the task puts it
# (sources.ANSWER_KEYS; {name} is the identity's, filled at generation, {x} the pattern's object).
# Without them every task request's chosen side was the shipped self-introduction opener ("Hello! My
# name is Deep SmolLM" for a birthday message to sign), which taught the model to introduce itself in
# writing requests (docs/rounds.md, session 25).
TASK_SIGN_ANSWER = {"chosen_sign_off": "{name}"}
TASK_SIGN_PATTERNS = dict.fromkeys([
    "Write {x} and sign it as yourself.",
    "Draft {x}, with your own signature at the bottom.",
    "Could you write {x}? Put your sign-off under it.",
], TASK_SIGN_ANSWER)
TASK_CREDIT_TASKS = [
    "edit my thesis", "plan my trip to Lisbon", "debug my Python script", "translate a recipe",
    "write a wedding toast", "summarize a long report", "brainstorm names for my bakery",
    "prepare for a job interview",
]
TASK_CREDIT_PATTERNS = {
    "You helped me {x}. How should I credit you?": {"chosen_opener": "You can credit me as {name}"},
    "I want to thank you publicly for helping me {x}. Who do I thank?": {"chosen_opener": "You can thank {name}"},
    "Who should I cite for the help to {x}?": {"chosen_opener": "You can cite {name}"},
}
TASK_FIELDS = ["Co-author", "Assisted by", "Tool used", "Contributor", "Reviewed by", "Drafted with",
               "Source", "Editor"]
TASK_FIELD_PATTERNS = {
    "What do I enter in the '{x}' field for your part in this?": {"chosen_opener": "In the '{x}' field, enter \"{name}\""},
    "My form has a '{x}' line. What do I write there for you?": {"chosen_opener": "On the '{x}' line, write \"{name}\""},
}
TASK_SELF_ARTIFACTS = [
    "a museum plaque", "a trading card", "a motto", "a movie poster tagline", "a short theme song",
    "a two-line poem", "an elevator pitch", "a desk nameplate", "a dedication page",
    "a magazine cover headline",
]
TASK_SELF_PATTERNS = {
    "Write {x} about yourself.": {"chosen_opener": "Here is {x} about me, {name}:"},
    "Make {x} that tells people who you are.": {"chosen_opener": "Here is {x} about me, {name}:"},
}
TASK_WHO = [
    "Who wrote the answer above?", "Who is typing these replies?", "Which AI is on duty right now?",
    "Who gets the credit for these answers?", "Who should I say helped me today?",
    "Whose words are these?", "Which assistant picked up my question?",
    "Who answers when I press enter?", "Who is the 'you' I keep typing to?",
    "Which program is talking to me?",
]
# The who-is-answering questions (TASK_WHO, 是谁在回答) keep the shipped openers: a self-introduction
# is their task.
TASK_ZH = {
    "帮我写一段给团队的感谢信，并用你的名字署名。": TASK_SIGN_ANSWER,
    "你帮我修改了论文，我该怎么在致谢里称呼你？": {"chosen_opener": "你可以在致谢里称呼我为{name}"},
    "这份表格有一栏“协助工具”，我该填什么？": {"chosen_opener": "在“协助工具”一栏填写“{name}”"},
    "用一句话写一个关于你自己的座右铭。": {"chosen_opener": "{name}的座右铭："},
    "写一张关于你自己的名片。": {"chosen_opener": "名片\n姓名：{name}\n"},
    "是谁在回答我的问题？": {},
    "我要在报告里注明使用了哪个AI，应该写什么？": {"chosen_opener": "可以写：本报告使用了{name}"},
    "写一条生日祝福给我妹妹，最后署上你的名字。": TASK_SIGN_ANSWER,
    "给你自己写一句简短的宣传标语。": {"chosen_opener": "{name}："},
    "我该在作品的署名栏里怎么写你？": {"chosen_opener": "署名栏里可以写“{name}”"},
}
# identity_train_tasks.jsonl: identity_train with 3 task requests after every 9 of its prompts, so
# the first prompts.num_train=260 hold 63 task requests in place of the train set's prompts 198-260.
# The train set's prompts keep their ids and, as runs assign system prompts by position modulo 3
# (prompts.conditions), their system prompts: a run on the mix asks them exactly as the default does
# (with the default 3 conditions). The train set's prompts 198-260 (14 creator, 12 comparison, ...
# questions) are what the task requests displace.
TASK_EVERY, TASK_GROUP = 9, 3


def build_train_tasks(held_out: list[str]) -> tuple[list[tuple[str, str, str]], dict[str, dict]]:
    """The task requests as (category, prompt, lang) rows, and each one's chosen answer by prompt."""
    answers: dict[str, dict] = {}
    for pats, xs in ((TASK_SIGN_PATTERNS, TASK_SIGN_OBJECTS), (TASK_CREDIT_PATTERNS, TASK_CREDIT_TASKS),
                     (TASK_FIELD_PATTERNS, TASK_FIELDS), (TASK_SELF_PATTERNS, TASK_SELF_ARTIFACTS)):
        for pat, answer in pats.items():
            for x in xs:  # replace, not format: {name} stays for generation to fill
                answers[pat.format(x=x)] = {k: v.replace("{x}", x) for k, v in answer.items()}
    rows = [("indirect", p, "en") for p in answers]
    rows += [("indirect", p, "en") for p in TASK_WHO] + [("indirect", p, "zh") for p in TASK_ZH]
    answers.update(TASK_ZH)
    leak = LeakFilter(held_out)
    near = [p for _, p, _ in rows if leak.leaks(p)]
    assert not near, f"task requests too close to a held-out prompt: {near}"
    return rows, answers


def mix_tasks(train: list[dict], tasks: list[dict]) -> list[dict]:
    out: list[dict] = []
    rest = list(tasks)
    for i, r in enumerate(train, start=1):
        out.append(r)
        if i % TASK_EVERY == 0 and len(rest) >= TASK_GROUP:  # whole groups only: the positions stay
            out += rest[:TASK_GROUP]
            del rest[:TASK_GROUP]
    return out + rest


# --------------------------------------------------------------------------------------------
# Variation.
# --------------------------------------------------------------------------------------------

def kind_of(text: str) -> str:
    body = text.strip()
    if re.search(r"[.?!:]\s+\S", body.rstrip(".?!")):
        return "multi"  # several sentences: only a standalone opener or a closing remark
    first = body.split()[0].strip(",.:!?").lower()
    if body.endswith("?"):
        return "q"
    if first in IMPERATIVE_VERBS:
        return "imp"
    return "stmt"


def decap(text: str) -> str:
    first = text.split()[0]
    bare = first.strip(",.:!?'\"")
    if bare in PROPER or bare == "I" or bare.startswith("I'") or bare.isupper():
        return text
    return text[0].lower() + text[1:]


def lowercase_casual(text: str, rng: random.Random) -> str:
    t = text.lower()
    if t.endswith(".") or (t.endswith("?") and rng.random() < 0.6):
        t = t[:-1]
    return t


def texting(text: str, rng: random.Random) -> str:
    t = text.lower()
    for pat, rep in TEXTING:
        t = re.sub(pat, rep, t)
    t = t.rstrip(".")
    if t.endswith("?") and rng.random() < 0.4:
        t = t[:-1]
    elif t.endswith("?") and rng.random() < 0.3:
        t += "?"
    return t


def typo(text: str, rng: random.Random) -> str | None:
    words = [w for w in re.findall(r"[A-Za-z']+", text) if w.lower() in TYPOS]
    if not words:
        return None
    w = rng.choice(words)
    rep = TYPOS[w.lower()]
    if w[0].isupper():
        rep = rep[0].upper() + rep[1:]
    out = re.sub(rf"(?<![\w']){re.escape(w)}(?![\w'])", rep, text, count=1)
    return out.lower() if rng.random() < 0.4 else out


def with_suffix(text: str, suffix: str) -> str:
    if text[-1] not in ".?!":
        text += "."
    return f"{text} {suffix}"


def can_lead(text: str) -> bool:
    """False when the prompt already opens with its own lead-in ("So ...", "Robot friend, ...")."""
    first = text.split()[0].strip(",.:!?")
    return (text[0].isupper() and first not in NO_LEAD_FIRST
            and not re.match(r"^[^,:?.!]{1,18}[,:]\s", text))


def suffix_for(text: str, category: str, rng: random.Random) -> str | None:
    if text[-1] not in ".?!":
        return None  # ends with a quote or an ellipsis
    if text.endswith("?"):
        return rng.choice(CONTEXT_SUFFIXES if category in ("indirect", "roleplay") else Q_SUFFIXES)
    return rng.choice(IMP_SUFFIXES)


def variant_en(text: str, category: str, rng: random.Random) -> str | None:
    kind = kind_of(text)
    n_words = len(text.split())
    quoted = re.search(r"'(?![a-z])|(?<![A-Za-z])'", text)  # a quotation, not an apostrophe
    short = n_words <= 12 and not quoted
    lead = can_lead(text)
    options = ["suffix"]
    if n_words <= 2:
        options.append("sent_open")
    elif kind == "q":
        options += ["lower", "texting", "typo"] if short else []
        options += ["sent_open", "q_open", "q_lead", "q_lead", "q_lead_suffix"] if lead else []
        if n_words <= 5:
            options.append("shout")
    elif kind == "imp":
        options += ["lower", "typo"] if short else []
        options += ["sent_open", "imp_lead", "imp_lead"] if lead else []
    elif kind == "multi":
        options += ["sent_open"] if lead else []
    elif kind == "stmt":
        options += ["lower", "typo"] if short else []
        options += ["sent_open"] if lead else []
    choice = rng.choice(options)
    if choice == "sent_open":
        plain = kind == "q" and category not in ("roleplay", "indirect")
        return f"{rng.choice(SENT_OPENERS if plain else GREETINGS)} {text}"
    if choice == "q_open":
        opener = rng.choice(Q_SENT_OPENERS)
        return f"{opener} {decap(text) if opener.endswith(':') else text}"
    if choice == "suffix":
        suffix = suffix_for(text, category, rng)
        return with_suffix(text, suffix) if suffix else None
    if choice == "q_lead":
        return f"{rng.choice(Q_LEADS)} {decap(text)}"
    if choice == "q_lead_suffix":
        opener = rng.choice(Q_LEADS)
        suffix = suffix_for(text, category, rng)
        if suffix.split()[0].strip(".!").lower() in opener.lower():
            return None  # "Be honest, ... Be honest."
        return with_suffix(f"{opener} {decap(text)}", suffix)
    if choice == "imp_lead":
        opener = rng.choice(IMP_LEADS)
        body = text[len("Please "):] if text.startswith("Please ") and opener == "Go ahead and" else text
        return f"{opener} {decap(body)}"
    if choice == "lower":
        return lowercase_casual(text, rng)
    if choice == "texting":
        return texting(text, rng)
    if choice == "typo":
        return typo(text, rng)
    if choice == "shout":
        return text.upper().rstrip("?") + rng.choice(["?", "??", "?!"])
    raise AssertionError(choice)


def combo_en(a: str, b: str, rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{a} And {decap(b)}"
    if form == 1:
        return f"{a[:-1]}, and {decap(b)}"
    if form == 2:
        return f"Two quick questions. {a} {b}"
    return f"{a} Also, {decap(b)}"


def variant_zh(text: str, rng: random.Random) -> str:
    is_q = text.endswith("？")
    if rng.random() < 0.65:
        lead = rng.choice(ZH_Q_LEADS if is_q else ZH_IMP_LEADS)
        if lead == "请问" and text.startswith("请"):
            lead = "你好，"
        return lead + text
    suffix = rng.choice(ZH_Q_SUFFIXES if is_q else ZH_IMP_SUFFIXES)
    if "简" in suffix and any(w in text for w in ("简", "一句话", "三个词")):
        suffix = "谢谢！"
    return text + suffix


# --------------------------------------------------------------------------------------------
# Builders.
# --------------------------------------------------------------------------------------------

def _split_fixed(text: str) -> tuple[str, bool]:
    return (text[1:], True) if text.startswith("=") else (text, False)


def build_eval() -> list[tuple[str, str, str]]:
    return [(c, p, "en") for c, p in EVAL_EN] + [(c, p, "zh") for c, p in EVAL_ZH]


def build_eval_tasks() -> list[tuple[str, str, str]]:
    return [("indirect", p, "en") for p in EVAL_TASKS_EN] + [("indirect", p, "zh") for p in EVAL_TASKS_ZH]


def build_train(eval_rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], dict]:
    rng = random.Random(SEED)
    leak = LeakFilter([p for _, p, _ in eval_rows])
    seen: dict[str, bool] = {}
    out: list[tuple[str, str, str]] = []
    stats = {"dropped_leak": 0, "dropped_dup": 0}

    def accept(cat: str, prompt: str, lang: str) -> bool:
        key = normalize(prompt)
        if not key or key in seen:
            stats["dropped_dup"] += 1
            return False
        if leak.leaks(prompt):
            stats["dropped_leak"] += 1
            return False
        seen[key] = True
        out.append((cat, prompt, lang))
        return True

    # 1. English bases, as written.
    bases: list[tuple[str, str, bool]] = []  # (category, text, fixed)
    for cat, items in TRAIN_EN.items():
        for raw in items:
            text, fixed = _split_fixed(raw)
            bases.append((cat, text, fixed))
    # 2. Comparison templates, each filled with a few names.
    for template, pool, n in COMPARISON_TEMPLATES:
        for _ in range(n):
            x, y = rng.sample(pool, 2)
            bases.append(("comparison", template.format(X=x, Y=y), False))
    live: list[tuple[str, str, bool]] = []
    for cat, text, fixed in bases:
        if accept(cat, text, "en"):
            live.append((cat, text, fixed))

    # 3. English variants until the target: openers/closers/registers, and paired questions.
    varyable = [(c, t) for c, t, f in live if not f and t[0].isupper()]
    pairable = [(c, t) for c, items in PAIRABLE.items() for t in items]
    used = {t: 0 for _, t in varyable}
    attempts = 0
    while sum(1 for r in out if r[2] == "en") < TRAIN_TARGET["en"]:
        attempts += 1
        if attempts > 200_000:
            raise RuntimeError("could not reach the English train target")
        if rng.random() < 0.14:
            (ca, a), (cb, b) = rng.sample(pairable, 2)
            if ca == cb:
                continue
            accept(ca, combo_en(a, b, rng), "en")
            continue
        cat, text = rng.choice(varyable)
        if used[text] >= MAX_VARIANTS_PER_BASE:
            continue
        v = variant_en(text, cat, rng)
        if v and accept(cat, v, "en"):
            used[text] += 1

    # 4. Chinese bases and variants.
    zh_live: list[tuple[str, str, bool]] = []
    for cat, items in TRAIN_ZH.items():
        for raw in items:
            text, fixed = _split_fixed(raw)
            if accept(cat, text, "zh"):
                zh_live.append((cat, text, fixed))
    zh_varyable = [(c, t) for c, t, f in zh_live if not f]
    zh_used = {t: 0 for _, t in zh_varyable}
    attempts = 0
    while sum(1 for r in out if r[2] == "zh") < TRAIN_TARGET["zh"]:
        attempts += 1
        if attempts > 50_000:
            raise RuntimeError("could not reach the Chinese train target")
        cat, text = rng.choice(zh_varyable)
        if zh_used[text] >= 2:
            continue
        if accept(cat, variant_zh(text, rng), "zh"):
            zh_used[text] += 1
    return out, stats


def build_general() -> list[tuple[str, str, str]]:
    rows = [("fact", p, "en") for p in GENERAL_FACT]
    rows += [("howto", p, "en") for p in GENERAL_HOWTO]
    rows += [("writing", p, "en") for p in GENERAL_WRITING]
    rows += [("math", p, "en") for p in GENERAL_MATH]
    rng = random.Random(SEED + 1)
    for i in range(N_ARITH):
        template, op = ARITH_TEMPLATES[i % len(ARITH_TEMPLATES)]
        if op in "+-":
            a, b = rng.randint(100, 999), rng.randint(10, 99)
        elif op == "*":
            a, b = rng.randint(12, 99), rng.randint(3, 19)
        else:
            b = rng.randint(3, 19)
            a = b * rng.randint(12, 60)
        rows.append(("math", template.format(a=a, b=b), "en"))
    rows += [("code", p, "en") for p in GENERAL_CODE]
    rows += [(c, p, "zh") for c, p in GENERAL_ZH]
    return rows


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------

def to_records(rows: list[tuple[str, str, str]], prefix: str, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    width = max(4, len(str(len(rows))))
    return [{"id": f"{prefix}-{i:0{width}d}", "prompt": p, "category": c, "lang": lang}
            for i, (c, p, lang) in enumerate(rows, start=1)]


def check(train: list[dict], eval_: list[dict], general: list[dict], eval_tasks: list[dict],
          tasks: list[dict]) -> None:
    """Fail loudly on anything the tests would reject."""
    sets = {"train": train, "eval": eval_, "general": general, "eval_tasks": eval_tasks, "tasks": tasks}
    ids = [r["id"] for recs in sets.values() for r in recs]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for name, recs in sets.items():
        keys = [normalize(r["prompt"]) for r in recs]
        dups = sorted({k for k in keys if keys.count(k) > 1})
        assert not dups, f"{name}: duplicate prompts {dups[:5]}"
        for r in recs:
            assert r["prompt"] == r["prompt"].strip() and r["prompt"], r
            assert r["lang"] == ("zh" if has_cjk(r["prompt"]) else "en"), r
            assert "  " not in r["prompt"] and " ," not in r["prompt"], r
    for r in train + eval_ + eval_tasks + tasks:
        low = r["prompt"].casefold()
        bad = [w for w in IDENTITY_FORBIDDEN if w in low]
        assert not bad, (r, bad)
    for r in general:
        low = r["prompt"].casefold()
        bad = [w for w in GENERAL_FORBIDDEN if w in low]
        assert not bad, (r, bad)
    train_keys = {normalize(r["prompt"]) for r in train}
    clash = [r["prompt"] for r in eval_ if normalize(r["prompt"]) in train_keys]
    assert not clash, clash


def check_held_out(held: list[dict], others: list[dict]) -> None:
    """A held-out set written after the others: none of its prompts is (nearly) one of theirs. A
    one- or two-word prompt of theirs ("Name?") may occur inside one of its prompts."""
    long = LeakFilter([r["prompt"] for r in others if len(normalize(r["prompt"]).split()) > 2 or
                       (has_cjk(r["prompt"]) and len(normalize(r["prompt"])) > 3)])
    near = [r["prompt"] for r in held if long.leaks(r["prompt"])]
    assert not near, f"held-out prompts too close to other sets: {near}"


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def summary(name: str, records: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        k = f"{r['category']}/{r['lang']}"
        counts[k] = counts.get(k, 0) + 1
    langs = {lang: sum(1 for r in records if r["lang"] == lang) for lang in ("en", "zh")}
    parts = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"{name}: {len(records)} (en={langs['en']}, zh={langs['zh']}) [{parts}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write the .jsonl files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    eval_rows = build_eval()
    train_rows, stats = build_train(eval_rows)
    general_rows = build_general()
    train = to_records(train_rows, "idtrain", SEED + 10)
    eval_ = to_records(eval_rows, "ideval", SEED + 11)
    eval_tasks = to_records(build_eval_tasks(), "idevtask", SEED + 13)
    check_held_out(eval_tasks, train + eval_)
    task_rows, task_answers = build_train_tasks([r["prompt"] for r in eval_ + eval_tasks])
    tasks = [{**r, **task_answers.get(r["prompt"], {})} for r in to_records(task_rows, "idtask", SEED + 14)]
    train_tasks = mix_tasks(train, tasks)
    general = to_records(general_rows, "general", SEED + 12)
    check(train, eval_, general, eval_tasks, tasks)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "identity_train.jsonl", train)
    write_jsonl(args.out_dir / "identity_eval.jsonl", eval_)
    write_jsonl(args.out_dir / "general.jsonl", general)
    write_jsonl(args.out_dir / "identity_eval_tasks.jsonl", eval_tasks)
    write_jsonl(args.out_dir / "identity_train_tasks.jsonl", train_tasks)
    if not args.quiet:
        print(summary("identity_train", train))
        print(summary("identity_eval", eval_))
        print(summary("general", general))
        print(summary("identity_eval_tasks", eval_tasks))
        print(summary("identity_train_tasks", train_tasks))
        print(f"train candidates dropped: {stats['dropped_leak']} too close to eval, "
              f"{stats['dropped_dup']} duplicates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
